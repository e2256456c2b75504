"""What the proxy costs: added latency (p50, p99) and sustained requests/s, side by side with direct access.

The upstream is a minimal stub (raw ASGI, fixed answers) so that the numbers are the proxy's own overhead:
one HTTP hop, routing, and the byte-for-byte relay. Client, proxy and stub share this machine's CPUs.

    .venv/bin/python benchmarks/proxy.py [--requests 400] [--concurrency 8 64 256] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
STREAM_EVENTS = 16
COMPLETION = json.dumps({"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "bench",
                         "choices": [{"index": 0, "text": "x" * 64, "finish_reason": "length"}]}).encode()
EVENT = b"data: " + json.dumps({"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "bench",
                                "choices": [{"index": 0, "text": "tok ", "finish_reason": None}]}).encode() + b"\n\n"


async def stub_app(scope, receive, send) -> None:
    """A fixed-answer OpenAI-shaped upstream: JSON for plain requests, STREAM_EVENTS events when "stream" is set."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "GET":
        models = b'{"object": "list", "data": [{"id": "bench", "object": "model"}]}'
        payload = models if scope["path"] == "/v1/models" else b"{}"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})
    elif json.loads(body).get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(STREAM_EVENTS):
            await send({"type": "http.response.body", "body": EVENT, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    else:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(COMPLETION)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": COMPLETION})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(argv: list[str], port: int, ready_path: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{argv} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    sys.exit(f"{argv} did not start")


def request_bytes(port: int, stream: bool) -> bytes:
    body = json.dumps({"model": "bench", "prompt": "hi", "max_tokens": STREAM_EVENTS, "stream": stream}).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class Connection:
    """A minimal keep-alive HTTP/1.1 client (content-length or chunked bodies), so that the client's own cost,
    which an HTTP library would add to both columns, stays small."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def exchange(self, request: bytes) -> bytes:
        self.writer.write(request)
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        if not head.startswith(b"http/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:200]!r}")
        if b"transfer-encoding: chunked" not in head:
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            return await self.reader.readexactly(length)
        body = b""
        while size := int(await self.reader.readuntil(b"\r\n"), 16):
            body += (await self.reader.readexactly(size + 2))[:-2]
        await self.reader.readexactly(2)
        return body

    def close(self) -> None:
        self.writer.close()


async def latencies(port: int, stream: bool, n: int) -> list[float]:
    """Sequential requests on one connection: each one's full response time, in ms (after n/10 warm-up ones)."""
    connection = await Connection.open(port)
    request, samples = request_bytes(port, stream), []
    for i in range(n + n // 10):
        start_time = time.perf_counter()
        await connection.exchange(request)
        if i >= n // 10:
            samples.append((time.perf_counter() - start_time) * 1000)
    connection.close()
    return samples


async def throughput(port: int, concurrency: int, duration: float) -> float:
    """Completed non-streamed requests per second with `concurrency` clients for `duration` seconds."""
    connections = [await Connection.open(port) for _ in range(concurrency)]
    request, done = request_bytes(port, False), 0

    async def worker(connection: Connection, until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            await connection.exchange(request)
            done += 1

    await asyncio.gather(*(worker(c, time.perf_counter() + 0.5) for c in connections))  # warm-up
    done, start_time = 0, time.perf_counter()
    await asyncio.gather(*(worker(c, start_time + duration) for c in connections))
    elapsed = time.perf_counter() - start_time
    for connection in connections:
        connection.close()
    return done / elapsed


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] if q < 100 else max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="sequential requests per latency row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64, 256], help="clients per throughput row")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput measurement")
    parser.add_argument("--strategy", default="min_expected_latency")
    parser.add_argument("--stub-port", type=int, help=argparse.SUPPRESS)  # internal: run the stub upstream
    args = parser.parse_args()
    if args.stub_port:
        import uvicorn

        uvicorn.run(stub_app, host="127.0.0.1", port=args.stub_port, log_level="error", access_log=False,
                    lifespan="off")
        return

    stub_port, proxy_port = free_port(), free_port()
    procs = []
    try:
        procs.append(start([sys.executable, __file__, "--stub-port", str(stub_port)], stub_port, "/v1/models"))
        procs.append(start([sys.executable, "-m", "s1serve.serve.proxy", "--server-name", "127.0.0.1", "--server-port",
                            str(proxy_port), "--routing-strategy", args.strategy, "--log-level", "error"],
                           proxy_port, "/nodes/status"))
        node = {"url": f"http://127.0.0.1:{stub_port}", "status": {"models": ["bench"]}}
        httpx.post(f"http://127.0.0.1:{proxy_port}/nodes/add", json=node).raise_for_status()

        rows = []
        for stream in (False, True):
            kind = f"streamed ({STREAM_EVENTS} events)" if stream else "non-streamed"
            direct = asyncio.run(latencies(stub_port, stream, args.requests))
            proxied = asyncio.run(latencies(proxy_port, stream, args.requests))
            for q in (50, 99):
                d, p = percentile(direct, q), percentile(proxied, q)
                rows.append((f"{kind} latency p{q} (ms)", f"{d:.2f}", f"{p:.2f}", f"+{p - d:.2f} ms"))
        for concurrency in args.concurrency:
            d = asyncio.run(throughput(stub_port, concurrency, args.duration))
            p = asyncio.run(throughput(proxy_port, concurrency, args.duration))
            rows.append((f"requests/s, {concurrency} clients", f"{d:.0f}", f"{p:.0f}", f"{p / d:.2f}x"))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()

    print(f"proxy overhead vs direct: 1 stub upstream, strategy {args.strategy}, {os.cpu_count()} CPUs shared by "
          f"client, proxy and stub; latency: {args.requests} sequential requests; "
          f"requests/s: {args.duration:g} s per row")
    header = ("", "direct", "proxy", "proxy cost")
    width = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print(f"{row[0]:<{width[0]}}  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(row[1:], width[1:])))


if __name__ == "__main__":
    main()
