"""Real api_server processes on loopback for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-s1serve-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    base_url: str  # http://127.0.0.1:PORT
    log_path: Path
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def start_api_server(model: Path, log_path: Path, *extra: str, timeout: float = 120.0) -> RunningServer:
    port = free_port()
    cmd = [
        sys.executable, "-m", "s1serve", "serve", "api_server", str(model),
        "--server-name", "127.0.0.1", "--server-port", str(port), "--dtype", "float32", *extra,
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = RunningServer(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"api_server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"api_server did not become healthy in {timeout}s:\n{server.log()}")


def stop(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def api_server(tiny_checkpoint, tmp_path_factory):
    server = start_api_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("api_server") / "server.log",
        "--model-name", "intern-s1-pro",
        "--reasoning-parser", "intern-s1",
        "--tool-call-parser", "qwen3",
        "--max-model-len", "2048",
        "--num-kv-blocks", "256",
        "--block-size", "16",
        "--api-keys", API_KEY,
    )
    server.api_key = API_KEY
    yield server
    stop(server)


@pytest.fixture
def client(api_server):
    from openai import OpenAI

    return OpenAI(base_url=api_server.v1, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def anthropic_client(api_server):
    from anthropic import Anthropic

    return Anthropic(base_url=api_server.base_url, api_key=API_KEY, max_retries=0, timeout=120)
