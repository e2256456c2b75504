"""Long prompt: the inter-token latency of short streams while one 60000-token prompt prefills beside them.

    .venv/bin/python benchmarks/long_prompt.py [--prompt-tokens 60000] [--model PATH] [--port 23401]

Starts `s1serve serve api_server MODEL --max-model-len 65536 --no-enable-prefix-caching` (the tiny preset is
written if MODEL is missing), then, over /v1/completions with token-id prompts, greedy, eos ignored:

1. 8 short streams (--stream-tokens each) alone: their inter-token latency (ITL) p50 / p99;
2. the long prompt (--long-output-tokens) sent while 8 such streams decode, a new stream started whenever one
   ends, until the long prompt's first token: the ITL of the streams' tokens that arrived meanwhile, and the long
   prompt's time to first token;
3. the long prompt again, alone.

Prefix caching is off, so the third request computes the whole prompt again (in full-budget chunks, where the
second took small chunks beside the decodes) rather than reading the second's blocks: the comparison of their
output ids is one of two real computations. Prints the ITL figures and their ratio, both TTFTs, the peak RSS
(VmHWM) of the server and each of its child processes; exits 1 if the two outputs differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import with_server  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("S1SERVE_CACHE", Path.home() / ".cache" / "s1serve")) / "soak-tiny-seed0"
VOCAB_LOW, VOCAB_HIGH = 1000, 150000  # ordinary token ids of the tiny checkpoint's vocabulary


async def stream(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> tuple[float, list[tuple[float, list[int]]]]:
    """Sends one streamed greedy completion; returns when it was sent and (arrival time, token ids) per event."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    sent, events = time.monotonic(), []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"completion failed: {response.status_code} {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            ids = (choices[0].get("token_ids") or []) if choices else []
            if ids:
                events.append((time.monotonic(), ids))
    return sent, events


def gaps(events: list[tuple[float, list[int]]]) -> list[tuple[float, float]]:
    """(end time, seconds) of each gap between consecutive events of one stream."""
    return [(b[0], b[0] - a[0]) for a, b in zip(events, events[1:])]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def short_prompts(rng: random.Random, count: int) -> list[list[int]]:
    return [[rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(rng.randint(16, 64))] for _ in range(count)]


async def streams_alone(client: httpx.AsyncClient, model: str, args: argparse.Namespace, rng: random.Random) -> list[float]:
    results = await asyncio.gather(*(stream(client, model, p, args.stream_tokens) for p in short_prompts(rng, 8)))
    return [g for _, events in results for _, g in gaps(events)]


async def streams_beside(client: httpx.AsyncClient, model: str, args: argparse.Namespace, rng: random.Random,
                         long_prompt: list[int]) -> tuple[list[float], float, list[int], int]:
    """ITLs of the streams during the long prompt's prefill, its TTFT, its output ids, streams run."""
    done = asyncio.Event()
    itls: list[tuple[float, float]] = []
    count = 0

    async def rolling() -> None:
        nonlocal count
        while not done.is_set():
            count += 1
            _, events = await stream(client, model, short_prompts(rng, 1)[0], args.stream_tokens)
            itls.extend(gaps(events))

    workers = [asyncio.create_task(rolling()) for _ in range(8)]
    await asyncio.sleep(2.0)  # the streams are decoding when the long prompt arrives
    sent, events = await stream(client, model, long_prompt, args.long_output_tokens)
    done.set()
    await asyncio.gather(*workers)
    first = events[0][0]
    during = [g for end, g in itls if sent < end <= first]
    return during, first - sent, [t for _, ids in events for t in ids], count


def peak_rss_mib(root: int) -> dict[str, float]:
    """VmHWM (peak resident memory) of `root` and of each of its descendants, by 'pid name'."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    peaks, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except OSError:
            continue
        peaks[f"{pid} {status['Name'].strip()}"] = int(status["VmHWM"].split()[0]) / 1024
    return peaks


async def drive(url: str, model: str, args: argparse.Namespace, server_pid: int) -> int:
    rng = random.Random(args.seed)
    long_prompt = [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(args.prompt_tokens)]
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        await stream(client, model, short_prompts(rng, 1)[0], 8)  # warm-up
        alone = await streams_alone(client, model, args, rng)
        p50, p99 = percentile(alone, 50) * 1e3, percentile(alone, 99) * 1e3
        print(f"8 streams alone: ITL p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(alone)} gaps)", flush=True)
        during, ttft, mixed_ids, count = await streams_beside(client, model, args, rng, long_prompt)
        d50, d99 = percentile(during, 50) * 1e3, percentile(during, 99) * 1e3
        print(f"8 streams while the {args.prompt_tokens}-token prompt prefills: ITL p50 {d50:.1f} ms, p99 {d99:.1f} ms"
              f" ({len(during)} gaps, {count} streams); p99 ratio {d99 / p99:.2f}x"
              f" ({'within' if d99 <= 3 * p99 else 'over'} 3x)", flush=True)
        print(f"long prompt beside the streams: TTFT {ttft:.1f} s", flush=True)
        sent, events = await stream(client, model, long_prompt, args.long_output_tokens)
        alone_ids = [t for _, ids in events for t in ids]
        print(f"long prompt alone: TTFT {events[0][0] - sent:.1f} s", flush=True)
    peaks = peak_rss_mib(server_pid)
    for name, mib in peaks.items():
        print(f"peak RSS {name}: {mib:.1f} MiB")
    print(f"peak RSS, server processes together: {sum(peaks.values()):.1f} MiB")
    same = mixed_ids == alone_ids
    print(f"long prompt output beside the streams == alone: {same} ({len(mixed_ids)} ids: {mixed_ids})")
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=60000)
    parser.add_argument("--long-output-tokens", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=200, help="output tokens of each short stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--port", type=int, default=23401)
    parser.add_argument("--server-arg", action="append", default=[], help="extra api_server flags (repeatable)")
    parser.add_argument("--startup-wait", type=float, default=900, help="seconds the server may take to be healthy")
    args = parser.parse_args()
    extra = ["--max-model-len", "65536", "--no-enable-prefix-caching", *args.server_arg]
    return with_server(args.model, args.port, extra, lambda url, model, pid: drive(url, model, args, pid),
                       args.startup_wait)


if __name__ == "__main__":
    sys.exit(main())
