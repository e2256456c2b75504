"""Serving load generator: streamed OpenAI completions against any server, or several side by side.

    .venv/bin/python benchmarks/serving.py --url NAME=http://HOST:PORT ...        # servers already running
    .venv/bin/python benchmarks/serving.py --server s1serve --server vllm [--offline] \
        [--concurrency 1 8 32] [--rate 2 4] [--rounds 2] [--input-len 128] [--output-len 128] \
        [--slo-ttft-ms 1000 --slo-tpot-ms 100] [--json out.json] [--plot out.png]

Every request is a streamed `/v1/completions` call: greedy, `ignore_eos` (an extra body field that s1serve and vLLM
both accept), exactly --output-len tokens, usage asked for in the last event. Prompts are fixed by --seed: lists of
token ids (both servers accept them as `prompt`; no tokenizer is involved) or, with --prompt-kind text, random
words. Each load point gets its own prompts, the same for every server and round, so a prefix cache never hits.

Load points: `--concurrency C` keeps C requests in flight (C x --requests-per-client in all); `--rate R` sends
--num-prompts requests at Poisson arrivals of R per second (seeded), at most --max-concurrency in flight.
Per point: TTFT, TPOT ((end-to-end - TTFT) / (tokens - 1)), ITL (gaps between streamed events; an event may carry
more than one token) and end-to-end latency, p50 and p99; output tok/s and requests/s over the point's wall time;
goodput = requests/s of those that met every --slo-* given. Latencies count from the moment a request is sent (under
a cap, a Poisson arrival may wait for a slot first).

--server NAME[=COMMAND] starts a server for its turn and stops it after (one server at a time): NAME alone is a
preset (s1serve, vllm: benchmarks/peers/vllm_cpu.sh); COMMAND may use {model}, {port} and {python}. A server starts
in --log-dir, not where this script runs: `python -m s1serve` puts its working folder first on sys.path, so a
COMMAND that serves another checkout through PYTHONPATH would otherwise import this one's package. Rounds
alternate the servers (a shared machine has slow spells; alternating keeps one from falling on one side only), and
the table shows each cell's best round with the range over rounds, and each side's ratio to the first.
--offline adds s1serve's in-process engine (`s1serve.LLM`, the same prompts and load points, driven step by step
with the same in-flight cap) as one more side; then the table has server/offline ratios and the batch-1 line
compares the server's inter-token latency with the offline decode step (issue 12's check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import aiohttp
from machine import describe_machine

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(os.environ.get("S1SERVE_CACHE", Path.home() / ".cache" / "s1serve")) / "bench-qwen3_moe-seed0"
PRESETS = {
    "s1serve": "{python} -m s1serve serve api_server {model} --server-name 127.0.0.1 --server-port {port} "
    "--log-level warning",
    "vllm": f"bash {REPO / 'benchmarks' / 'peers' / 'vllm_cpu.sh'} serve {{model}} {{port}}",
}
OFFLINE = "offline"
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their can has been if more when will would who so no time").split()

Prompt = Union[list[int], str]


@dataclass(frozen=True)
class Load:
    """One load point: `concurrency` requests in flight, or Poisson arrivals at `rate` per second."""

    kind: str  # "concurrency" or "rate"
    value: float
    requests: int
    cap: int | None  # most requests in flight (None: no cap)

    @property
    def label(self) -> str:
        return f"C={self.value:g}" if self.kind == "concurrency" else f"rate={self.value:g}/s"

    def arrivals(self, seed: int) -> list[float]:
        """Send times in seconds from the start: all at once under a concurrency cap, else Poisson."""
        if self.kind == "concurrency":
            return [0.0] * self.requests
        rng, t, times = random.Random(seed), 0.0, []
        for _ in range(self.requests):
            t += rng.expovariate(self.value)
            times.append(t)
        return times


@dataclass
class RequestResult:
    ttft: float = math.nan
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Slo:
    ttft: float | None  # seconds
    tpot: float | None
    e2e: float | None

    def met(self, r: RequestResult) -> bool:
        tpot = (r.e2e - r.ttft) / max(r.output_tokens - 1, 1)
        return r.error is None and all(
            limit is None or value <= limit for value, limit in ((r.ttft, self.ttft), (tpot, self.tpot), (r.e2e, self.e2e))
        )


def make_prompts(kind: str, count: int, input_len: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    if kind == "ids":
        return [[rng.randrange(1000, 150000) for _ in range(input_len)] for _ in range(count)]
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    return ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (rank - low)


def summarize(results: list[RequestResult], wall: float, slo: Slo) -> dict:
    """The point's figures: latencies in ms (p50, p99), throughputs per second of wall time."""
    done = [r for r in results if r.error is None]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    out = {
        "requests": len(results),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "wall_s": wall,
        "output_tok_s": sum(r.output_tokens for r in done) / wall,
        "request_s": len(done) / wall,
        "goodput_request_s": sum(slo.met(r) for r in done) / wall,
    }
    for name, values in (("ttft", [r.ttft for r in done]), ("tpot", tpots),
                         ("itl", [gap for r in done for gap in r.itl]), ("e2e", [r.e2e for r in done])):
        out[f"{name}_p50_ms"] = percentile(values, 50) * 1e3
        out[f"{name}_p99_ms"] = percentile(values, 99) * 1e3
    return out


# ---------------------------------------------------------------------------------------------------- HTTP side


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    """One streamed completion: the time of its first and of each later event carrying text, and its token count."""
    result = RequestResult()
    start = time.perf_counter()
    last = None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                return RequestResult(error=f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[5:])
                now = time.perf_counter()
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                if any(choice.get("text") for choice in event.get("choices") or ()):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        return RequestResult(error=f"{type(exc).__name__}: {exc}")
    result.e2e = time.perf_counter() - start
    if result.output_tokens != body["max_tokens"]:
        result.error = f"{result.output_tokens} tokens streamed, {body['max_tokens']} asked for"
    return result


async def run_http(url: str, model: str, prompts: list[Prompt], load: Load, output_len: int, seed: int) -> tuple[list[RequestResult], float]:
    """Sends `prompts` at the load's arrival times, at most `load.cap` in flight; (results, wall seconds)."""
    slots = asyncio.Semaphore(load.cap or len(prompts))
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)

    async def one(prompt: Prompt, at: float, start: float, session: aiohttp.ClientSession) -> RequestResult:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        async with slots:
            body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            return await stream_one(session, url, body)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(p, at, start, session) for p, at in zip(prompts, load.arrivals(seed))))
        return list(results), time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process for one turn: started in its own process group, ready once /v1/models answers."""

    def __init__(self, name: str, command: str, model: Path, log_dir: Path, start_timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = shlex.split(command.format(model=model, port=self.port, python=sys.executable))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.log = log_dir / f"{name}.log"
        with open(self.log, "a") as log:
            log.write(f"\n$ {shlex.join(argv)}\n")
            log.flush()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_dir,
                                         start_new_session=True)
        try:
            self.model, self.version = self._wait_ready(start_timeout)
        except BaseException:  # not ready, or the run interrupted while it starts: leave no server behind
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> tuple[str, str | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready; see {self.log}")
            try:
                return served_model(self.url)
            except (OSError, ValueError, KeyError, IndexError):
                time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        """SIGINT to the group (a clean shutdown), SIGKILL after 30 s; the group holds the server's workers too."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.read().decode()


def served_model(url: str) -> tuple[str, str | None]:
    """(the model id the server lists first, its version from GET /version where it has one)."""
    model = json.loads(_get(f"{url}/v1/models"))["data"][0]["id"]
    try:
        version = json.loads(_get(f"{url}/version")).get("version")
    except (OSError, ValueError):
        version = None
    return model, version


# ------------------------------------------------------------------------------------------------- offline side


class Offline:
    """s1serve's engine in this process, driven as the server drives it: requests admitted at the load's arrival
    times under the same in-flight cap, one `step()` at a time, a token's time taken when its step returns."""

    def __init__(self, model: Path):
        sys.path.insert(0, str(REPO))
        from s1serve import LLM

        self.llm = LLM(model, dtype="bfloat16", skip_tokenizer_init=True)
        self.version = f"s1serve.LLM in-process, commit {commit()}"

    def run(self, prompts: list[list[int]], load: Load, output_len: int, seed: int) -> tuple[list[RequestResult], float]:
        from s1serve import SamplingParams

        engine = self.llm.engine
        engine.blocks.reset_prefix_cache()
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        arrivals = load.arrivals(seed)
        cap = load.cap or len(prompts)
        results = [RequestResult() for _ in prompts]
        sent: dict[str, tuple[int, float]] = {}  # request id -> (index, send time)
        last: dict[str, float] = {}
        next_index, in_flight = 0, 0
        start = time.perf_counter()
        while next_index < len(prompts) or in_flight:
            now = time.perf_counter()
            while next_index < len(prompts) and in_flight < cap and start + arrivals[next_index] <= now:
                request_id = f"bench-{next_index}"
                engine.add_request(request_id, prompts[next_index], params)
                sent[request_id] = (next_index, now)
                next_index, in_flight = next_index + 1, in_flight + 1
            if not in_flight:
                time.sleep(max(0.0, start + arrivals[next_index] - time.perf_counter()))
                continue
            deltas = engine.step()
            now = time.perf_counter()
            for delta in deltas:
                index, sent_at = sent[delta.request_id]
                result = results[index]
                if delta.token_ids:
                    if delta.request_id in last:
                        result.itl.append(now - last[delta.request_id])
                    else:
                        result.ttft = now - sent_at
                    last[delta.request_id] = now
                    result.output_tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    result.e2e = now - sent_at
                    in_flight -= 1
        return results, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------- reporting


def commit() -> str:
    """The checked-out s1serve commit (what the s1serve preset and --offline run)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def span(values: list[float], digits: int = 1) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if len(values) == 1 or round(low, digits) == round(high, digits) else f"{low:.{digits}f}-{high:.{digits}f}"


def print_table(rows: list[dict], sides: list[str], loads: list[Load]) -> None:
    """Per load point and side: output tok/s best of the rounds (range), TTFT p50 and TPOT p50 of that best round;
    then each other side's ratio to the first: best over best, and the range of the per-round ratios."""
    by = {(r["server"], r["load"]): [] for r in rows}
    for r in rows:
        by[(r["server"], r["load"])].append(r)
    base = sides[0]
    header = ["load"] + [f"{s} tok/s (TTFT p50 / TPOT p50 ms)" for s in sides] + [f"{base} / {s}" for s in sides[1:]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for load in loads:
        cells = [load.label]
        for side in sides:
            runs = by.get((side, load.label), [])
            if not runs:
                cells.append("n/a")
                continue
            best = max(runs, key=lambda r: r["output_tok_s"])
            failed = sum(r["failed"] for r in runs)
            cells.append(f"{best['output_tok_s']:.1f} [{span([r['output_tok_s'] for r in runs])}] "
                         f"({best['ttft_p50_ms']:.0f} / {best['tpot_p50_ms']:.1f})" + (f" {failed} failed" if failed else ""))
        ours = by.get((base, load.label), [])
        for side in sides[1:]:
            theirs = by.get((side, load.label), [])
            if not ours or not theirs:
                cells.append("n/a")
                continue
            best = max(r["output_tok_s"] for r in ours) / max(r["output_tok_s"] for r in theirs)
            per_round = [a["output_tok_s"] / b["output_tok_s"] for a, b in zip(ours, theirs)]
            cells.append(f"{best:.2f}x [{span(per_round, 2)}]")
        print("| " + " | ".join(cells) + " |")


def print_batch1(rows: list[dict], servers: list[str]) -> None:
    """Each server's batch-1 inter-token latency against the offline engine's decode step (its ITL at C=1)."""
    offline = [r for r in rows if r["server"] == OFFLINE and r["load"] == "C=1"]
    if not offline:
        return
    step = [r["itl_p50_ms"] for r in offline]
    print(f"Batch-1: offline decode step (ITL p50 at C=1) {span(step, 2)} ms over {len(step)} round(s)")
    for server in servers:
        runs = [r for r in rows if r["server"] == server and r["load"] == "C=1"]
        if runs:
            itl, tpot = [r["itl_p50_ms"] for r in runs], [r["tpot_p50_ms"] for r in runs]
            print(f"  {server}: ITL p50 {span(itl, 2)} ms ({min(itl) / min(step):.2f}x the offline step, per round "
                  f"{span([a / b for a, b in zip(itl, step)], 2)}x); TPOT p50 {span(tpot, 2)} ms")


def nice_step(top: float) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about five ticks up to `top`."""
    raw = top / 5
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def plot(rows: list[dict], sides: list[str], title: str, path: Path) -> None:
    """PNG: output tok/s (x) against TTFT p50 and TPOT p50 (y); per side one line through its concurrency points
    and one through its rate points, each point its best round."""
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    best: dict[str, dict[str, dict]] = {}
    for r in rows:
        kept = best.setdefault(r["server"], {}).get(r["load"])
        if kept is None or r["output_tok_s"] > kept["output_tok_s"]:
            best[r["server"]][r["load"]] = r
    panels = [("ttft_p50_ms", "TTFT p50 (ms)"), ("tpot_p50_ms", "TPOT p50 (ms)")]
    width, height, left, top, bottom = 560, 440, 60, 50, 40
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 6), title, fill="black")
    every = [r for points in best.values() for r in points.values()]
    xstep = nice_step(max(r["output_tok_s"] for r in every))
    xmax = xstep * math.ceil(max(r["output_tok_s"] for r in every) / xstep)
    for p, (key, label) in enumerate(panels):
        ys = [r[key] for r in every if not math.isnan(r[key])] or [1.0]
        ystep = nice_step(max(ys))
        ymax = ystep * math.ceil(max(ys) / ystep)
        x0, y0, x1, y1 = p * width + left, top, (p + 1) * width - 20, height - bottom

        def at(x: float, y: float) -> tuple[float, float]:
            return x0 + (x1 - x0) * x / xmax, y1 - (y1 - y0) * y / ymax

        draw.rectangle((x0, y0, x1, y1), outline="black")
        for i in range(round(xmax / xstep) + 1):
            gx, _ = at(i * xstep, 0)
            draw.line((gx, y1, gx, y1 + 4), fill="black")
            draw.text((gx - 10, y1 + 6), f"{i * xstep:g}", fill="black")
        for i in range(round(ymax / ystep) + 1):
            _, gy = at(0, i * ystep)
            draw.line((x0 - 4, gy, x0, gy), fill="black")
            draw.text((x0 - 48, gy - 6), f"{i * ystep:g}", fill="black")
        draw.text((x0 + (x1 - x0) // 2 - 30, y1 + 20), "output tok/s", fill="black")
        draw.text((x0, y0 - 16), label, fill="black")
        for s, side in enumerate(sides):
            colour = colours[s % len(colours)]
            draw.text((x1 - 110, y0 + 8 + 14 * s), side, fill=colour)
            for kind in ("concurrency", "rate"):
                points = sorted((r for r in best.get(side, {}).values() if r["kind"] == kind and not math.isnan(r[key])),
                                key=lambda r: r["value"])
                xy = [at(r["output_tok_s"], r[key]) for r in points]
                if len(xy) > 1:
                    draw.line(xy, fill=colour, width=2)
                for (x, y), r in zip(xy, points):
                    draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
                    draw.text((x + 5, y - 12), r["load"], fill=colour)
    image.save(path)


# -------------------------------------------------------------------------------------------------------- main


def write_json(path: Path, args: argparse.Namespace, versions: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"machine": describe_machine(), "s1serve_checkout": commit(), "versions": versions,
                                "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


def parse_sides(args: argparse.Namespace) -> list[tuple[str, str | None, str | None]]:
    """(name, url of a running server, command to start one), in the order given; the offline side last."""
    sides = []
    for spec in args.url:
        name, _, url = spec.partition("=")
        if not url:
            sys.exit(f"--url takes NAME=URL, got {spec!r}")
        sides.append((name, url.rstrip("/"), None))
    for spec in args.server:
        name, _, command = spec.partition("=")
        if not command and name not in PRESETS:
            sys.exit(f"--server {spec!r}: give NAME=COMMAND or a preset name ({', '.join(PRESETS)})")
        sides.append((name, None, command or PRESETS[name]))
    if args.offline:
        sides.append((OFFLINE, None, None))
    names = [name for name, _, _ in sides]
    if not sides or len(set(names)) != len(names) or (OFFLINE in names[:-1]):
        sys.exit(f"give one or more servers with distinct names (--url, --server, --offline); got {names}")
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", action="append", default=[], metavar="NAME=URL", help="a running server")
    parser.add_argument("--server", action="append", default=[], metavar="NAME[=COMMAND]",
                        help=f"a server to start for its turn; presets: {', '.join(PRESETS)}")
    parser.add_argument("--offline", action="store_true", help="add s1serve's in-process engine as a side")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="checkpoint for presets and --offline (the bench preset, written if missing)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--rate", type=float, nargs="*", default=[], help="Poisson arrival rates, requests/s")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests per concurrency point: C x this")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per rate point")
    parser.add_argument("--max-concurrency", type=int, default=None, help="in-flight cap of rate points")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompt-kind", choices=["ids", "text"], default="ids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all sides, alternating")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--slo-e2e-ms", type=float, default=None)
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds for a started server to answer")
    parser.add_argument("--json", type=Path, default=None, help="write every round's figures here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG: output tok/s against TTFT and TPOT")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/serving-bench"), help="started servers' logs")
    args = parser.parse_args()

    sides = parse_sides(args)
    if args.offline and args.prompt_kind != "ids":
        sys.exit("--offline sends token ids: use --prompt-kind ids")
    if (any(c for _, _, c in sides) or args.offline) and not (args.model / "config.json").is_file():
        sys.path.insert(0, str(REPO))
        from s1serve.checkpoint.tiny import write_tiny_checkpoint

        print(f"writing the bench checkpoint (qwen3_moe) to {args.model} ...", flush=True)
        write_tiny_checkpoint(args.model, "bench", seed=0, arch="qwen3_moe")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    slo = Slo(*(None if v is None else v / 1e3 for v in (args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)))
    loads = [Load("concurrency", c, c * args.requests_per_client, c) for c in args.concurrency]
    loads += [Load("rate", r, args.num_prompts, args.max_concurrency) for r in args.rate]
    prompts = [make_prompts(args.prompt_kind, load.requests, args.input_len, args.seed + 1 + i)
               for i, load in enumerate(loads)]
    warmup = make_prompts(args.prompt_kind, 2, args.input_len, args.seed + 10_000)
    print(f"machine: {describe_machine()}", flush=True)

    rows: list[dict] = []
    versions: dict[str, str | None] = {}
    offline: Offline | None = None
    for round_ in range(args.rounds):
        for name, url, command in sides:
            server = None
            try:
                if name == OFFLINE:
                    if offline is None:
                        offline = Offline(args.model)
                        offline.run(warmup, Load("concurrency", 2, 2, 2), 8, 0)
                    versions[name] = offline.version

                    def run(p, load, seed):  # noqa: E306
                        return offline.run(p, load, args.output_len, seed)
                else:
                    if command is not None:
                        server = Server(name, command, args.model, args.log_dir, args.start_timeout)
                        url, model, versions[name] = server.url, server.model, server.version
                    else:
                        model, versions[name] = served_model(url)
                    asyncio.run(run_http(url, model, warmup, Load("concurrency", 2, 2, 2), 8, 0))

                    def run(p, load, seed, url=url, model=model):  # noqa: E306
                        return asyncio.run(run_http(url, model, p, load, args.output_len, seed))
                for i, load in enumerate(loads):
                    results, wall = run(prompts[i], load, args.seed + i)
                    row = {"server": name, "round": round_ + 1, "load": load.label, **asdict(load),
                           **summarize(results, wall, slo), "load_average_1m": os.getloadavg()[0]}
                    rows.append(row)
                    if args.json:  # after every point, so that an interrupted run keeps what it measured
                        write_json(args.json, args, versions, rows)
                    print(f"round {round_ + 1} {name:>10} {load.label:>11}: {row['output_tok_s']:7.1f} tok/s "
                          f"{row['request_s']:6.2f} req/s goodput {row['goodput_request_s']:6.2f} | TTFT "
                          f"{row['ttft_p50_ms']:7.1f}/{row['ttft_p99_ms']:7.1f} TPOT {row['tpot_p50_ms']:6.1f}/"
                          f"{row['tpot_p99_ms']:6.1f} ITL {row['itl_p50_ms']:6.1f}/{row['itl_p99_ms']:6.1f} E2E "
                          f"{row['e2e_p50_ms']:7.0f}/{row['e2e_p99_ms']:7.0f} ms (p50/p99), load average "
                          f"{row['load_average_1m']:.1f}"
                          + (f" {row['failed']} failed: {row['errors']}" if row["failed"] else ""), flush=True)
            except RuntimeError as exc:
                print(f"round {round_ + 1} {name}: {exc}", flush=True)
            finally:
                if server is not None:
                    server.stop()

    names = [name for name, _, _ in sides]
    print()
    print(f"Serving, {args.input_len} in / {args.output_len} out ({args.prompt_kind}), greedy, ignore_eos, streamed; "
          f"output tok/s best of {args.rounds} alternating rounds [range], with that round's TTFT / TPOT p50")
    if any(v is not None for v in (slo.ttft, slo.tpot, slo.e2e)):
        print(f"SLO: TTFT <= {args.slo_ttft_ms} ms, TPOT <= {args.slo_tpot_ms} ms, E2E <= {args.slo_e2e_ms} ms "
              "(goodput per round above)")
    print_table(rows, names, loads)
    print()
    print_batch1(rows, [n for n in names if n != OFFLINE])
    print("versions: " + "; ".join(f"{n}: {versions.get(n) or 'no /version'}" for n in names)
          + f"; s1serve checkout {commit()}")
    print(f"machine: {describe_machine()}")
    if args.plot and rows:
        plot(rows, names, f"{args.input_len} in / {args.output_len} out, greedy, streamed; {describe_machine()}", args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
