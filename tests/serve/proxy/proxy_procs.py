"""Real processes for the proxy tests (stub api_servers and the proxy) on free loopback ports, and client helpers.

Every wait is bounded; every process is killed by the fixture that started it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
UPSTREAM_APP = HERE / "upstream_app.py"
START_TIMEOUT_S = 60.0
PYTHONPATH = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": PYTHONPATH}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Server:
    """One server process; its output goes to a log file shown when it fails to start."""

    def __init__(self, argv: list[str], port: int, name: str, ready_path: str) -> None:
        self.argv, self.port, self.name, self.ready_path = argv, port, name, ready_path
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix=f"s1serve-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=ENV)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not start in {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: the node vanishes mid-request, as a crashed server does."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (graceful shutdown, lifespan exit), then SIGKILL if it lingers."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.unlink(missing_ok=True)


class InProcessServer:
    """An ASGI app served by uvicorn on a thread of the test process: a real HTTP server on a real port, without
    paying a process start (the routing tests' proxies; lifecycle tests use `python -m s1serve.serve.proxy`)."""

    def __init__(self, app: Any, name: str, port: int | None = None) -> None:
        import uvicorn

        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=name, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), f"{name} to start")
        assert self.server.started, f"{name} failed to start (see the log above)"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def proxy_app(strategy: str, *, health_interval: float = 0.25, seed: int = 0, **settings: Any) -> tuple[Any, int]:
    """The real proxy app and its port, configured as the tests' proxy processes are."""
    from s1serve.serve.proxy.app import create_app
    from s1serve.serve.proxy.config import ProxyConfig

    defaults = {"server_name": "127.0.0.1", "server_port": free_port(), "health_timeout": 2.0}
    config = ProxyConfig(**(defaults | settings), routing_strategy=strategy, health_interval=health_interval, seed=seed)
    return create_app(config), config.server_port


class Processes:
    """Starts servers and guarantees they are gone at close()."""

    def __init__(self) -> None:
        self.servers: list[Server | InProcessServer] = []

    def upstream(self, name: str, *, proxy_url: str | None = None, models: tuple[str, ...] = ("stub-model",),
                 capacity: int = 1, port: int | None = None) -> Server:
        port = port or free_port()
        argv = [sys.executable, str(UPSTREAM_APP), "--port", str(port), "--name", name, "--capacity", str(capacity)]
        argv += [arg for m in models for arg in ("--model", m)]
        if proxy_url:
            argv += ["--proxy-url", proxy_url]
        return self._add(Server(argv, port, name, "/health"))

    def api_server(self, name: str, checkpoint: Path, *, proxy_url: str, port: int | None = None,
                   extra: tuple[str, ...] = ()) -> Server:
        """A real `s1serve serve api_server` on a checkpoint, joining the proxy by --proxy-url."""
        port = port or free_port()
        argv = [sys.executable, "-m", "s1serve", "serve", "api_server", str(checkpoint), "--server-name", "127.0.0.1",
                "--server-port", str(port), "--proxy-url", proxy_url, "--model-name", "tiny", "--dtype", "float32",
                "--num-kv-blocks", "128", "--block-size", "16", "--max-model-len", "1024", "--log-level", "warning",
                *extra]
        return self._add(Server(argv, port, name, "/health"))

    def proxy(self, strategy: str = "round_robin", *, health_interval: float = 0.25, seed: int = 0,
              port: int | None = None, extra: tuple[str, ...] = ()) -> Server:
        port = port or free_port()
        argv = [sys.executable, "-m", "s1serve.serve.proxy", "--server-name", "127.0.0.1", "--server-port", str(port),
                "--routing-strategy", strategy, "--health-interval", str(health_interval), "--health-timeout", "2",
                "--seed", str(seed), "--log-level", "warning", *extra]
        return self._add(Server(argv, port, f"proxy-{strategy}", "/nodes/status"))

    def inprocess_proxy(self, strategy: str, **settings: Any) -> InProcessServer:
        app, port = proxy_app(strategy, **settings)
        return self.inprocess(app, f"proxy-{strategy}", port)

    def inprocess(self, app: Any, name: str, port: int | None = None) -> InProcessServer:
        server = InProcessServer(app, name, port)
        self.servers.append(server)
        return server

    def _add(self, server: Server) -> Server:
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            if isinstance(server, InProcessServer):
                server.stop()
            else:
                server.kill()
                server.log.unlink(missing_ok=True)


# ---- client side ---------------------------------------------------------------------------------------------


def body(*, stream: bool = False, max_tokens: int = 4, model: str | None = "stub-model", chat: bool = False) -> dict:
    request: dict[str, Any] = {"max_tokens": max_tokens, "stream": stream}
    if model is not None:
        request["model"] = model
    if chat:
        request["messages"] = [{"role": "user", "content": "hi"}]
    else:
        request["prompt"] = "hi"
    return request


def path_of(request: dict) -> str:
    return "/v1/chat/completions" if "messages" in request else "/v1/completions"


def expected_text(max_tokens: int) -> str:
    return "".join(f"tok{i} " for i in range(max_tokens))


@dataclass
class Outcome:
    """How one request ended, as the client saw it."""

    status: int
    content: bytes
    stream: bool

    def events(self) -> list[str]:
        return [line[len("data: "):] for line in self.content.decode().split("\n\n") if line.startswith("data: ")]

    def stream_error(self) -> bool:
        return any(e != "[DONE]" and "error" in json.loads(e) for e in self.events())

    def text(self) -> str:
        if not self.stream:
            choice = json.loads(self.content)["choices"][0]
            return choice["message"]["content"] if "message" in choice else choice["text"]
        parts = [json.loads(e)["choices"][0] for e in self.events() if e != "[DONE]"]
        return "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in parts)

    def complete(self, max_tokens: int) -> bool:
        ends = self.events()[-1:] == ["[DONE]"] if self.stream else True
        clean = not (self.stream and self.stream_error())
        return self.status == 200 and ends and clean and self.text() == expected_text(max_tokens)

    def clean_error(self) -> bool:
        """A failure the client is told about: an error status with an OpenAI error body, or an error event + [DONE]."""
        if self.stream and self.status == 200:
            return self.stream_error() and self.events()[-1] == "[DONE]"
        return self.status >= 400 and "error" in json.loads(self.content)


async def send(client: httpx.AsyncClient, base_url: str, request: dict) -> Outcome:
    response = await client.post(base_url + path_of(request), json=request)
    return Outcome(response.status_code, response.content, bool(request.get("stream")))


def run_requests(base_url: str, requests: list[dict], concurrency: int,
                 on_progress: Callable[[int], Any] | None = None) -> list[Outcome]:
    """Send `requests` with `concurrency` workers (in order of the list); `on_progress(done)` after each one."""

    async def main() -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(requests)
        queue = list(enumerate(requests))[::-1]
        done = 0
        async with httpx.AsyncClient(timeout=60.0) as client:

            async def worker() -> None:
                nonlocal done
                while queue:
                    index, request = queue.pop()
                    results[index] = await send(client, base_url, request)
                    done += 1
                    if on_progress:
                        on_progress(done)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results  # type: ignore[return-value]

    return asyncio.run(main())


def state(server: Server) -> dict:
    return httpx.get(server.url + "/admin/state", timeout=5).json()


def configure(server: Server, **changes: Any) -> None:
    httpx.post(server.url + "/admin/config", json=changes, timeout=5).raise_for_status()


def node_status(proxy: Server | InProcessServer) -> dict[str, dict]:
    return httpx.get(proxy.url + "/nodes/status", timeout=5).json()


def add_node(proxy: Server | InProcessServer, url: str, capacity: int = 1, models: list[str] | None = None) -> dict:
    status = {"capacity": capacity} | ({"models": models} if models is not None else {})
    response = httpx.post(proxy.url + "/nodes/add", json={"url": url, "status": status}, timeout=10)
    response.raise_for_status()
    return response.json()


def received(servers: list[Server]) -> list[int]:
    return [state(s)["received"] for s in servers]
