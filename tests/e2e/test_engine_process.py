"""The engine in its own process behind the API server(s), as real processes: a killed engine process makes the
server answer 503 within a second and exit non-zero; with --api-server-count 2 a killed API server leaves the engine
serving the other through the same port, and the requests it had in flight are aborted (their KV blocks freed);
a client that goes away mid-stream frees its blocks too."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx

from e2e.conftest import start_api_server, stop

ENGINE_ARGS = ("--model-name", "tiny", "--num-kv-blocks", "64", "--block-size", "16", "--max-model-len", "1024")


def children(pid: int) -> dict[int, str]:
    """The live child processes of `pid`: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found[int(entry)] = command
    return found


def child_named(pid: int, name: str) -> int:
    (match,) = [child for child, command in children(pid).items() if f"s1serve.distributed.spawned {name}" in command]
    return match


def gauge(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def complete(base_url: str, max_tokens: int = 4) -> list[int]:
    reply = httpx.post(
        f"{base_url}/v1/completions",
        json={"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": max_tokens, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def start_stream(base_url: str, started: threading.Event, lines: list[str] | None = None) -> threading.Thread:
    """A long streamed request, left running in a thread (it ends when its server goes away); its non-empty
    lines go to `lines`."""

    def run() -> None:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as reply:
                for line in reply.iter_lines():
                    if line and lines is not None:
                        lines.append(line)
                    started.set()
        except httpx.HTTPError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_until(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, what
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_killed_engine_process_gets_503_within_a_second_and_the_server_exits(tiny_checkpoint, tmp_path):
    server = start_api_server(tiny_checkpoint, tmp_path / "server.log", *ENGINE_ARGS)
    try:
        started, lines = threading.Event(), []
        in_flight = start_stream(server.base_url, started, lines)
        assert started.wait(60)
        engine = child_named(server.process.pid, "engine-core-0")
        os.kill(engine, signal.SIGKILL)
        killed_at = time.monotonic()
        unhealthy_after = wait_until(
            lambda: httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503, 5, "no 503"
        )
        refused = httpx.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "hi"}, timeout=5)
        in_flight.join(10)
        code = server.process.wait(timeout=20)
        exited_after = time.monotonic() - killed_at
    finally:
        if server.process.poll() is None:
            stop(server)
    print(f"\nkilled the engine process: /health 503 after {unhealthy_after:.3f} s, server exited with {code} "
          f"after {exited_after:.1f} s")
    assert unhealthy_after < 1.0
    assert refused.status_code == 503 and "engine" in refused.json()["error"]["message"]
    # The request in flight got its error (one error event, then [DONE]) before the server exited.
    assert lines[-1] == "data: [DONE]", lines[-3:]
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == 503 and "engine process" in error["message"], error
    assert code == 1, server.log()


def test_two_api_servers_one_killed_the_other_serves_and_its_requests_are_aborted(tiny_checkpoint, tmp_path):
    server = start_api_server(tiny_checkpoint, tmp_path / "server.log", *ENGINE_ARGS, "--api-server-count", "2")
    try:
        launcher = server.process.pid
        engine = child_named(launcher, "engine-core-0")
        api_servers = [child_named(launcher, f"api-server-{i}") for i in range(2)]
        want = complete(server.base_url, 8)
        assert all(complete(server.base_url, 8) == want for _ in range(6))  # whichever server takes it
        # Long streams through both servers (the kernel spreads connections), then one server is killed.
        events = [threading.Event() for _ in range(6)]
        streams = [start_stream(server.base_url, started) for started in events]
        for started in events:
            assert started.wait(60)
        assert gauge(server.base_url, "s1serve_num_requests_running") > 0
        os.kill(api_servers[0], signal.SIGKILL)
        # Connections the kernel queued on its socket in the moment it died are reset; new ones go to the survivor.
        wait_until(lambda: api_servers[0] not in children(launcher), 5, "the killed API server was not reaped")
        # Requests through the port keep succeeding (the survivor takes every new connection).
        for _ in range(5):
            assert complete(server.base_url, 8) == want
        # The killed server's streams were aborted by the engine and the survivor's ran out or were freed; either
        # way all blocks come back and nothing stays running.
        for thread in streams:
            thread.join(120)
        wait_until(lambda: gauge(server.base_url, "s1serve_num_requests_running") == 0, 30, "requests still running")
        assert gauge(server.base_url, "s1serve_kv_cache_usage_ratio") == 0
        assert engine in children(launcher) and server.process.poll() is None
        assert "api-server-0" in server.log() and "1 API servers remain" in server.log()
    finally:
        stop(server)
    assert server.process.returncode == 0, server.log()


def test_a_client_that_goes_away_mid_stream_frees_its_blocks(tiny_checkpoint, tmp_path):
    server = start_api_server(tiny_checkpoint, tmp_path / "server.log", *ENGINE_ARGS)
    try:
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.v1}/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            for _ in range(3):
                next(lines)
            assert gauge(server.base_url, "s1serve_num_requests_running") == 1
            assert gauge(server.base_url, "s1serve_kv_cache_usage_ratio") > 0
        wait_until(lambda: gauge(server.base_url, "s1serve_kv_cache_usage_ratio") == 0, 10, "blocks not freed")
        assert gauge(server.base_url, "s1serve_num_requests_running") == 0
    finally:
        stop(server)
