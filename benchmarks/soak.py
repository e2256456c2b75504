"""Soak: steady mixed traffic against one server for a long time; memory and KV usage must stay flat, nothing lost.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--rate 2] [--model PATH] [--url http://HOST:PORT]

Without --url it starts `s1serve serve api_server MODEL` (the tiny preset is written if MODEL is missing) and stops
it after. Traffic, at Poisson arrivals of --rate per second (seeded): streamed chat, non-streamed chat, chat
constrained by a JSON schema, streamed completions with n=2, and a share of each that the client abandons early
(a disconnect the server must count as an abort). Every --sample-every seconds: the resident memory of the server
and its child processes (/proc), the KV-cache usage and running/waiting gauges from /metrics.

At the end it prints the samples, the least-squares slope of RSS (MiB per minute) and of KV usage over the run's
second half (the first half includes warm-up: caches filling, pools growing), the RSS slope over the second
half's samples taken with nothing running (the others also hold the running steps' passing tensors), and the
accounting: every request sent is either answered (200, checked: text present, JSON valid where constrained),
abandoned by us, or a counted error with its status. It exits 1 if a request is unaccounted for (no answer and
no error before the client timeout) or a 5xx came back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(os.environ.get("S1SERVE_CACHE", Path.home() / ".cache" / "s1serve")) / "soak-tiny-seed0"
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
KINDS = ("chat_stream", "chat", "chat_json", "completion_n2")


@dataclass
class Tally:
    """What happened to each request, by kind."""

    outcomes: Counter = field(default_factory=Counter)

    def add(self, kind: str, outcome: str) -> None:
        self.outcomes[(kind, outcome)] += 1

    def total(self, outcome_prefix: str = "") -> int:
        return sum(v for (_, o), v in self.outcomes.items() if o.startswith(outcome_prefix))


def request_body(kind: str, rng: random.Random, model: str) -> tuple[str, dict]:
    words = " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "omega", "sigma")) for _ in range(rng.randint(4, 40)))
    max_tokens = rng.randint(8, 64)
    if kind == "completion_n2":
        return "/v1/completions", {"model": model, "prompt": words, "max_tokens": max_tokens, "n": 2,
                                   "stream": True, "temperature": 0.8}
    body = {"model": model, "messages": [{"role": "user", "content": words}], "max_tokens": max_tokens,
            "stream": kind == "chat_stream"}
    if kind == "chat_json":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}
        body["max_tokens"] = 200
        body["chat_template_kwargs"] = {"enable_thinking": False}
    return "/v1/chat/completions", body


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, model: str, abandon: bool,
                      tally: Tally, timeout: float) -> None:
    path, body = request_body(kind, rng, model)
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", path, json=body) as response:
                if abandon:
                    await asyncio.sleep(rng.uniform(0, 0.3))
                    tally.add(kind, "abandoned")
                    return  # leaving the block closes the connection: the server must abort the request
                raw = await response.aread()
    except TimeoutError:
        tally.add(kind, "lost (no answer before the client timeout)")
        return
    except httpx.HTTPError as exc:
        tally.add(kind, f"transport error {type(exc).__name__}")
        return
    if response.status_code != 200:
        tally.add(kind, f"error {response.status_code}")
        return
    tally.add(kind, "ok" if answer_is_valid(kind, raw) else "bad answer")


def answer_is_valid(kind: str, raw: bytes) -> bool:
    if body_is_stream(kind):
        return raw.rstrip().endswith(b"data: [DONE]")
    choice = json.loads(raw)["choices"][0]
    content = choice["message"].get("content")
    if kind == "chat_json" and choice["finish_reason"] == "stop":
        try:
            json.loads(content or "")
        except json.JSONDecodeError:
            return False  # a finished constrained answer must be valid JSON
    return content is not None


def body_is_stream(kind: str) -> bool:
    return kind in ("chat_stream", "completion_n2")


def process_tree_rss_mib(root: int) -> dict[int, float]:
    """Resident memory of `root` and of each of its descendants, from /proc, by pid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    rss, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss[pid] = int(line.split()[1]) / 1024
        except OSError:
            pass
    return rss


def gauges(text: str) -> dict[str, float]:
    wanted = ("s1serve_kv_cache_usage_ratio", "s1serve_num_requests_running", "s1serve_num_requests_waiting")
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


async def sample(client: httpx.AsyncClient, server_pid: int | None, start: float, every: float,
                 samples: list[dict], stop: asyncio.Event) -> None:
    while not stop.is_set():
        metrics = gauges((await client.get("/metrics")).text)
        row = {"t": time.monotonic() - start, **metrics}
        if server_pid is not None:
            rss = process_tree_rss_mib(server_pid)
            row["rss_mib"] = sum(rss.values())
            row["rss_api_server_mib"] = rss.get(server_pid, 0.0)  # the rest is the engine process
        samples.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass


async def drive(url: str, model: str, args: argparse.Namespace, server_pid: int | None) -> int:
    rng = random.Random(args.seed)
    tally, samples, tasks = Tally(), [], set()
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        start = time.monotonic()
        sampler = asyncio.create_task(sample(client, server_pid, start, args.sample_every, samples, stop))
        sent = 0
        while time.monotonic() - start < args.minutes * 60:
            kind = rng.choice(args.kinds)
            task = asyncio.create_task(one_request(client, kind, random.Random(rng.random()), model,
                                                   rng.random() < args.abandon_share, tally, args.client_timeout))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)
        await asyncio.sleep(args.sample_every)  # one sample after the last answer: everything should be idle
        stop.set()
        await sampler
    return report(sent, tally, samples)


def report(sent: int, tally: Tally, samples: list[dict]) -> int:
    print(f"\nsent {sent} requests")
    for (kind, outcome), count in sorted(tally.outcomes.items()):
        print(f"  {kind:14s} {outcome:45s} {count}")
    accounted = sum(tally.outcomes.values())
    half = samples[len(samples) // 2:]
    for key in ("rss_mib", "rss_api_server_mib", "s1serve_kv_cache_usage_ratio"):
        points = [(s["t"], s[key]) for s in half if key in s]
        if points:
            print(f"{key}: first {samples[0].get(key, float('nan')):.3f}, last {samples[-1][key]:.3f}, "
                  f"second-half slope {slope_per_minute(points):+.4f} per minute")
    # A sample taken while requests run also holds their steps' passing tensors; the idle ones show what stays.
    idle = [(s["t"], s["rss_mib"]) for s in half if "rss_mib" in s and s.get("s1serve_num_requests_running") == 0]
    if len(idle) >= 2:
        print(f"rss_mib at the {len(idle)} second-half samples with nothing running: "
              f"slope {slope_per_minute(idle):+.4f} per minute")
    last = samples[-1]
    print(f"after the run: kv usage {last.get('s1serve_kv_cache_usage_ratio')}, running "
          f"{last.get('s1serve_num_requests_running')}, waiting {last.get('s1serve_num_requests_waiting')}")
    bad = tally.total("lost") + tally.total("transport") + tally.total("bad") + tally.total("error 5")
    print(f"accounted {accounted}/{sent}; lost, broken or 5xx: {bad}")
    return 0 if accounted == sent and bad == 0 else 1


def with_server(model: Path, port: int, extra: list[str], run: Callable[[str, str, int], Awaitable[int]],
                wait: float = 300) -> int:
    """Starts the api_server, awaits run(url, served model name, server pid), stops the server; run's status."""
    proc = start_server(model, port, extra, wait)
    try:
        url = f"http://127.0.0.1:{port}"
        served = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        return asyncio.run(run(url, served, proc.pid))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_server(model: Path, port: int, extra: list[str], wait: float = 300) -> subprocess.Popen:
    """Starts the api_server and returns once /health answers 200 (within `wait` seconds, else exits)."""
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "s1serve", "make-tiny", "--out", str(model), "--preset", "tiny",
                        "--seed", "0"], check=True)
    cmd = [sys.executable, "-m", "s1serve", "serve", "api_server", str(model), "--server-name", "127.0.0.1",
           "--server-port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was healthy")
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"the server was not healthy within {wait:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson arrivals)")
    parser.add_argument("--abandon-share", type=float, default=0.1, help="share of requests the client abandons")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--client-timeout", type=float, default=300.0, help="a request unanswered by then is lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="the traffic's kinds of request")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--url", help="a running server (its memory is then not sampled)")
    parser.add_argument("--port", type=int, default=23399)
    parser.add_argument("--server-arg", action="append", default=[], help="extra api_server flags (repeatable)")
    args = parser.parse_args()
    if args.url:
        model = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
        return asyncio.run(drive(args.url, model, args, None))
    return with_server(args.model, args.port, args.server_arg, lambda url, model, pid: drive(url, model, args, pid))


if __name__ == "__main__":
    sys.exit(main())
