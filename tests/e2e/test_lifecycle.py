"""A request's and a server's lifecycle, with real processes on loopback: a client that disconnects aborts its request
(streamed or not, on every generating route) and is counted as an abort; SIGTERM drains (in-flight requests finish,
new ones get 503, exit 0) on the api_server and on the proxy; a second SIGTERM exits at once; /health answers at
once while an engine step runs and turns 503 once the step has run past --engine-step-timeout.

Slow steps come from the engine process's test-only hook S1SERVE_TEST_STEP_SLEEP_S (every step sleeps that long
first), so that requests are still running when the test acts, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from e2e.conftest import free_port, start_api_server, stop

ENGINE_ARGS = ("--model-name", "tiny", "--num-kv-blocks", "256", "--block-size", "16", "--max-model-len", "1024")
STEP_SLEEP_ENV = "S1SERVE_TEST_STEP_SLEEP_S"
LONG = 900  # max_tokens of a request that is still running when the test acts (>= 900 slowed steps)


def start_slow_server(checkpoint: Path, log_path: Path, step_sleep_s: float, *extra: str):
    with pytest.MonkeyPatch.context() as env:
        env.setenv(STEP_SLEEP_ENV, str(step_sleep_s))
        return start_api_server(checkpoint, log_path, *ENGINE_ARGS, *extra)


def metric(base_url: str, name: str, **labels: str) -> float:
    """A sample of /metrics (0 when the labelled series does not exist yet)."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    selector = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    found = re.search(rf"^{re.escape(name + selector)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_until(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out after {timeout} s: {what}"
        time.sleep(0.01)
    return time.monotonic() - start


def raw_post(base_url: str, path: str, body: dict) -> socket.socket:
    """Sends a POST on a socket of its own and returns the socket, unread: closing it is the client going away."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


# ---- a client that disconnects ------------------------------------------------------------------------------

ROUTES = {
    "completions": ("/v1/completions", {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": LONG, "ignore_eos": True}),
    "chat": ("/v1/chat/completions",
             {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG, "ignore_eos": True}),
    "responses": ("/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": LONG}),
    "messages": ("/v1/messages",
                 {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG}),
}


@pytest.fixture(scope="module")
def slowed_server(tiny_checkpoint, tmp_path_factory):
    server = start_slow_server(tiny_checkpoint, tmp_path_factory.mktemp("lifecycle") / "server.log", 0.02)
    yield server
    stop(server)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", list(ROUTES))
def test_a_client_that_disconnects_is_aborted_within_a_second_and_counted_as_an_abort(slowed_server, endpoint, stream):
    base = slowed_server.base_url
    path, body = ROUTES[endpoint]
    aborts = metric(base, "s1serve_requests_total", endpoint=endpoint, outcome="abort")
    oks = metric(base, "s1serve_requests_total", endpoint=endpoint, outcome="ok")
    sock = raw_post(base, path, {**body, "stream": stream})
    try:
        wait_until(lambda: metric(base, "s1serve_num_requests_running") == 1, 30, "the request never ran")
        time.sleep(0.2)  # a few decode steps
        assert metric(base, "s1serve_kv_cache_usage_ratio") > 0
    finally:
        sock.close()
    gone_after = wait_until(lambda: metric(base, "s1serve_num_requests_running") == 0, 5, "still running")
    print(f"\n{endpoint} ({'streamed' if stream else 'whole'}): gone from the running requests {gone_after:.3f} s "
          "after the client closed its connection")
    assert gone_after < 1.0
    assert metric(base, "s1serve_kv_cache_usage_ratio") == 0
    wait_until(lambda: metric(base, "s1serve_requests_total", endpoint=endpoint, outcome="abort") == aborts + 1, 5,
               "the abort was not counted")
    assert metric(base, "s1serve_requests_total", endpoint=endpoint, outcome="ok") == oks
    # The server goes on: a short request on the same route completes.
    reply = httpx.post(base + path, json={**body, **_short(endpoint)}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert metric(base, "s1serve_requests_total", endpoint=endpoint, outcome="ok") == oks + 1


def _short(endpoint: str) -> dict:
    return {"max_output_tokens": 2} if endpoint == "responses" else {"max_tokens": 2}


# ---- SIGTERM drains -------------------------------------------------------------------------------------------


async def _stream(base_url: str, max_tokens: int, started: asyncio.Event, counter: list[int]) -> dict:
    """One streamed completion to its end: its chunks' finish reasons and whether [DONE] came."""
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    reasons, done, text = [], False, ""
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[len("data: "):])
                assert "error" not in chunk, chunk
                if not started.is_set():
                    counter[0] += 1
                    started.set()
                reasons += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
                text += "".join(c["text"] for c in chunk["choices"])
    return {"reasons": reasons, "done": done}


def test_sigterm_during_20_streams_drains_them_refuses_new_requests_and_exits_0(tiny_checkpoint, tmp_path):
    grace = 120  # generous: on a loaded 2-core machine a step of 20 sequences has taken over a second
    server = start_slow_server(tiny_checkpoint, tmp_path / "server.log", 0.05, "--shutdown-timeout", str(grace))
    n, max_tokens = 20, 20

    async def scenario() -> tuple[list[dict], httpx.Response, httpx.Response, float]:
        events = [asyncio.Event() for _ in range(n)]
        counter = [0]
        streams = [asyncio.create_task(_stream(server.base_url, max_tokens, e, counter)) for e in events]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.3)  # the drain starts within uvicorn's 0.1 s tick; the streams run >= 2 s more
        async with httpx.AsyncClient(timeout=10) as client:
            refused = await client.post(f"{server.v1}/completions", json={"model": "tiny", "prompt": "hi"})
            health = await client.get(f"{server.base_url}/health")
        results = await asyncio.wait_for(asyncio.gather(*streams), grace)
        drained_after = time.monotonic() - signalled
        return results, refused, health, drained_after

    try:
        results, refused, health, drained_after = asyncio.run(scenario())
        code = server.process.wait(timeout=60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    print(f"\nSIGTERM during {n} streams: all finished {drained_after:.1f} s after the signal, exit {code}")
    assert all(r["reasons"] == ["length"] and r["done"] for r in results), results
    assert refused.status_code == 503
    assert "shutting down" in refused.json()["error"]["message"], refused.text
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert health.status_code == 503 and "shutting down" in health.json()["error"]["message"]
    assert code == 0, server.log()
    assert "draining" in server.log() and "still in flight" not in server.log()  # none was cut at the grace period


def test_a_second_sigterm_exits_at_once(tiny_checkpoint, tmp_path):
    server = start_slow_server(tiny_checkpoint, tmp_path / "server.log", 0.05, "--shutdown-timeout", "300")
    try:
        sock = raw_post(server.base_url, "/v1/completions",
                        {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": LONG, "ignore_eos": True})
        wait_until(lambda: metric(server.base_url, "s1serve_num_requests_running") == 1, 30, "the request never ran")
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503, 5, "no drain")
        assert server.process.poll() is None  # draining: the request runs on (for up to 300 s)
        server.process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = server.process.wait(timeout=10)
        exited_after = time.monotonic() - start
        sock.close()
    finally:
        if server.process.poll() is None:
            server.process.kill()
    print(f"\nsecond SIGTERM: exit {code} after {exited_after:.2f} s")
    assert code == 128 + signal.SIGTERM, server.log()
    assert exited_after < 5
    assert "SIGTERM again while draining: exiting now" in server.log()


# ---- the watchdog -------------------------------------------------------------------------------------------------


def test_health_answers_during_a_hung_step_and_turns_503_past_the_step_timeout(tiny_checkpoint, tmp_path):
    # Every step hangs 4 s; the limit is 1.5 s: /health must answer at once throughout, 200 first, then 503.
    server = start_slow_server(tiny_checkpoint, tmp_path / "server.log", 4.0, "--engine-step-timeout", "1.5")
    try:
        sock = raw_post(server.base_url, "/v1/completions", {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 1})
        sent = time.monotonic()
        answers = []  # (seconds from the request to the answer, status, message, seconds the answer took)
        while time.monotonic() - sent < 3.5:
            asked = time.monotonic()
            reply = httpx.get(f"{server.base_url}/health", timeout=2)
            answered = time.monotonic()
            answers.append((answered - sent, reply.status_code, reply.text, answered - asked))
            time.sleep(0.1)
        sock.settimeout(30)
        assert b"200 OK" in sock.recv(65536)  # the hung step ends: the request completes
        sock.close()
        healthy_after = httpx.get(f"{server.base_url}/health", timeout=2)
    finally:
        stop(server)
    slowest = max(a[3] for a in answers)
    first_503 = next((a for a in answers if a[1] == 503), None)
    print(f"\nhung step: {len(answers)} /health answers, slowest {slowest * 1000:.0f} ms; first 503 "
          f"{first_503[0]:.2f} s after the request: {first_503[2]}")
    assert slowest < 1.0
    assert any(a[1] == 200 and a[0] < 1.5 for a in answers)  # a step younger than the limit is healthy
    assert first_503 is not None and 1.5 <= first_503[0] < 3.0
    message = json.loads(first_503[2])["error"]["message"]
    assert re.match(r"engine step 1 \(1 request\) has been running for \d+\.\d s, longer than "
                    r"--engine-step-timeout 1.5 s", message), message
    assert healthy_after.status_code == 200


# ---- the proxy ----------------------------------------------------------------------------------------------------


def start_proxy(log_path: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "s1serve.serve.proxy", "--server-name", "127.0.0.1", "--server-port", str(port),
           "--health-interval", "0.25", "--log-level", "info", *extra]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/nodes/status", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the proxy did not start:\n{log_path.read_text()}")


def node_healthy(proxy_url: str, node: str) -> bool:
    return bool(httpx.get(f"{proxy_url}/nodes/status", timeout=2).json().get(node, {}).get("healthy"))


def test_proxy_sigterm_drains_forwarded_streams_and_a_draining_node_leaves_its_proxy(tiny_checkpoint, tmp_path):
    port = free_port()
    proxy_url = f"http://127.0.0.1:{port}"
    procs = [start_proxy(tmp_path / "proxy.log", port, "--shutdown-timeout", "60")]
    try:
        server = start_slow_server(tiny_checkpoint, tmp_path / "server.log", 0.03, "--proxy-url", proxy_url)
        procs.append(server.process)
        node = server.base_url
        wait_until(lambda: node_healthy(proxy_url, node), 30, "the api_server did not join the proxy")

        async def through_proxy() -> tuple[list[dict], httpx.Response, httpx.Response]:
            events = [asyncio.Event() for _ in range(5)]
            streams = [asyncio.create_task(_stream(proxy_url, 60, e, [0])) for e in events]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            procs[0].send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(timeout=10) as client:
                refused = await client.post(f"{proxy_url}/v1/completions", json={"model": "tiny", "prompt": "hi"})
                health = await client.get(f"{proxy_url}/health")
            return await asyncio.wait_for(asyncio.gather(*streams), 60), refused, health

        results, refused, health = asyncio.run(through_proxy())
        proxy_code = procs[0].wait(timeout=30)
        assert all(r["reasons"] == ["length"] and r["done"] for r in results), results
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"], refused.text
        assert health.status_code == 503
        assert proxy_code == 0, (tmp_path / "proxy.log").read_text()

        # A proxy again on the same url, told of the node; the node drains: it leaves the proxy at once, while its
        # own stream still runs, and then exits 0.
        procs.append(start_proxy(tmp_path / "proxy2.log", port))
        httpx.post(f"{proxy_url}/nodes/add", json={"url": node}, timeout=10).raise_for_status()
        wait_until(lambda: node_healthy(proxy_url, node), 10, "the node is not healthy in the new proxy")

        async def node_drains() -> tuple[dict, float, bool]:
            started = asyncio.Event()
            stream = asyncio.create_task(_stream(node, 100, started, [0]))
            await asyncio.wait_for(started.wait(), 60)
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while node in httpx.get(f"{proxy_url}/nodes/status", timeout=2).json():
                assert time.monotonic() - signalled < 5, "the draining node did not leave the proxy"
                await asyncio.sleep(0.05)
            left_after, still_streaming = time.monotonic() - signalled, not stream.done()
            return await asyncio.wait_for(stream, 60), left_after, still_streaming

        result, left_after, still_streaming = asyncio.run(node_drains())
        node_code = server.process.wait(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"\nthe draining node left its proxy {left_after:.2f} s after SIGTERM")
    assert still_streaming
    assert result["reasons"] == ["length"] and result["done"]
    assert node_code == 0, server.log()
