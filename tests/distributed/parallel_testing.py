"""Helpers of the parallel-deployment tests: the 16 prompts, the tp=1 reference, real launcher processes.

Launchers are `python -m s1serve serve api_server ...` processes (with --tp/--ep/--dp/--nnodes flags); their
ranks are their child processes. Everything runs on CPU with gloo, in float32.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from s1serve import LLM, SamplingParams

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
ENGINE_ARGS = dict(block_size=16, num_kv_blocks=128)
MODEL_NAME = "tiny"
SERVER_ARGS = ["--model-name", MODEL_NAME, "--dtype", "float32", "--block-size", "16", "--num-kv-blocks", "128",
               "--log-level", "info"]


def prompts() -> list[list[int]]:
    """16 prompts of 1 to 90 ordinary tokens."""
    rng = random.Random(6)
    lengths = [1, 2, 5, 90, 17, 33, 64, 3, 48, 9, 71, 12, 26, 40, 7, 55]
    return [[rng.randrange(1000, 150000) for _ in range(n)] for n in lengths]


@functools.lru_cache(maxsize=None)
def _single(checkpoint: str) -> LLM:
    return LLM(checkpoint, dtype="float32", **ENGINE_ARGS)


@functools.lru_cache(maxsize=None)
def reference(checkpoint: str) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """Greedy ids and texts of every prompt from one process (tp=1), computed once per checkpoint."""
    outs = _single(checkpoint).generate(prompt_token_ids=prompts(), sampling_params=GREEDY, use_tqdm=False)
    return tuple(tuple(o.outputs[0].token_ids) for o in outs), tuple(o.outputs[0].text for o in outs)


def reference_logits(checkpoint: str) -> torch.Tensor:
    """One process's logits at every position of the longest prompt."""
    return _single(checkpoint).prompt_logits(prompts()[3])


def free_port(count: int = 1) -> int:
    """A port p with p .. p + count - 1 free right now."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + count < 65536 and all(_free(port + i) for i in range(1, count)):
            return port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class Launched:
    process: subprocess.Popen
    log_path: Path
    ports: list[int]  # the API ports it serves (none when headless)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def launch(checkpoint: Path, log_path: Path, *flags: str, port: int | None = None, ports: int = 1,
           env: dict[str, str] | None = None) -> Launched:
    """Starts `s1serve serve api_server CHECKPOINT FLAGS`; `ports` API ports from `port` (0 for headless)."""
    port = port if port is not None else free_port(max(ports, 1))
    cmd = [sys.executable, "-m", "s1serve", "serve", "api_server", str(checkpoint), "--server-name", "127.0.0.1",
           "--server-port", str(port), *SERVER_ARGS, *flags]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    return Launched(proc, log_path, [port + i for i in range(ports)])


def wait_healthy(launched: Launched, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(launched.urls)
    while pending and time.monotonic() < deadline:
        if launched.process.poll() is not None:
            raise RuntimeError(f"launcher exited with {launched.process.returncode}:\n{launched.log()}")
        try:
            if httpx.get(f"{pending[0]}/health", timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    if pending:
        stop(launched)
        raise RuntimeError(f"{pending} not healthy in {timeout}s:\n{launched.log()}")


def stop(launched: Launched, sig: int | None = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Signals the launcher (unless `sig` is None) and waits for it (killing it after `timeout`); its status."""
    if sig is not None and launched.process.poll() is None:
        launched.process.send_signal(sig)
    try:
        return launched.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        launched.process.kill()
        launched.process.wait()
        raise


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def completions(urls: list[str], prompt_ids: list[list[int]]) -> list[str]:
    """Greedy texts of the prompts through the openai SDK, all in flight at once, prompt i sent to
    urls[i % len(urls)]."""
    from openai import AsyncOpenAI

    async def main() -> list[str]:
        clients = [AsyncOpenAI(base_url=f"{u}/v1", api_key="none", max_retries=0, timeout=120) for u in urls]
        try:
            responses = await asyncio.gather(*(
                clients[i % len(clients)].completions.create(
                    model=MODEL_NAME, prompt=ids, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
                )
                for i, ids in enumerate(prompt_ids)
            ))
        finally:
            for client in clients:
                await client.close()
        return [r.choices[0].text for r in responses]

    return asyncio.run(main())


def sleeper(parent_pid: int) -> None:
    """A spawned child that only waits (and dies with its parent)."""
    from s1serve.distributed.worker import die_with_parent

    die_with_parent(parent_pid)
    time.sleep(120)


def guide_client(base_url: str) -> None:
    """The deployment guide's client code: the first served model, a chat completion."""
    from openai import OpenAI

    client = OpenAI(api_key="EMPTY", base_url=f"{base_url}/v1", max_retries=0, timeout=120)
    model_name = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": [{"type": "text", "text": "tell me about an interesting physical phenomenon."}]}],
        temperature=0.8, top_p=0.95, max_tokens=8,
    )
    assert model_name == MODEL_NAME and response.model == MODEL_NAME
    assert response.choices[0].finish_reason in ("length", "stop") and response.usage.completion_tokens >= 1
