"""Engine memory while new batch shapes keep arriving: with torch's kernel caches at their default size, and bounded.

    .venv/bin/python benchmarks/engine_memory.py [--model PATH] [--rounds 30] [--passes 5] [--seed 0]

Runs the offline engine (`s1serve.LLM`) twice, each in a fresh process (the caches read their capacity once per
process): once with ideep's and oneDNN's primitive caches at the libraries' default of 1024 entries, once as
s1serve bounds them (`s1serve/engine/host_memory.py`). Each pass is --rounds rounds of chat requests, a batch of
1-12 conversations of random length and 8-64 new tokens per round, drawn afresh for every pass, so new batch
shapes keep arriving as in a long-running server. After each pass it returns freed memory to the OS
(`malloc_trim`, as the engine loop does when idle) and prints the process's RSS and the live heap (glibc's
`mallinfo2` in-use bytes): memory that keeps growing pass after pass is held, not merely cached by the allocator.

It explains what benchmarks/soak.py saw before the caches were bounded: the engine process's RSS rose while new
shapes arrived, ever more slowly, and the API server's stayed flat.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path

DEFAULT_MODEL = Path(os.environ.get("S1SERVE_CACHE", Path.home() / ".cache" / "s1serve")) / "soak-tiny-seed0"
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma")
LIBRARY_DEFAULT_ENTRIES = "1024"


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def memory_mib() -> tuple[float, float]:
    """(RSS, live glibc heap) of this process after handing free memory back, MiB."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc_trim(0)
    rss_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    return rss_kib / 1024, libc.mallinfo2().uordblks / 2**20


def run_passes(model: Path, rounds: int, passes: int, seed: int) -> list[tuple[float, float]]:
    from s1serve import LLM, SamplingParams

    llm = LLM(str(model))
    samples = []
    for p in range(passes):
        rng = random.Random(seed * 1000 + p)  # new requests every pass: new batch shapes
        for _ in range(rounds):
            conversations, params = [], []
            for _ in range(rng.randint(1, 12)):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
                conversations.append([{"role": "user", "content": text}])
                params.append(SamplingParams(max_tokens=rng.randint(8, 64), temperature=0.8,
                                             seed=rng.randint(0, 1 << 30)))
            llm.chat(conversations, params, use_tqdm=False)
        gc.collect()
        samples.append(memory_mib())
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint (the tiny preset if missing)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per pass")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=("default", "bounded"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "default":
            from s1serve.engine.host_memory import KERNEL_CACHE_VARIABLES

            for name in KERNEL_CACHE_VARIABLES:
                os.environ[name] = LIBRARY_DEFAULT_ENTRIES  # s1serve keeps a setting the user made
        print(json.dumps(run_passes(args.model, args.rounds, args.passes, args.seed)))
        return 0

    if not (args.model / "config.json").exists():
        from s1serve.checkpoint.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(args.model, "tiny", 0)
    results = {}
    for mode in ("default", "bounded"):
        cmd = [sys.executable, __file__, "--child", mode, "--model", str(args.model), "--rounds", str(args.rounds),
               "--passes", str(args.passes), "--seed", str(args.seed)]
        results[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    print(f"{'pass':>4} | {'caches 1024: RSS':>16} {'live heap':>10} | {'bounded: RSS':>12} {'live heap':>10}  (MiB)")
    for p, ((rss_d, heap_d), (rss_b, heap_b)) in enumerate(zip(results["default"], results["bounded"]), 1):
        print(f"{p:>4} | {rss_d:>16.1f} {heap_d:>10.1f} | {rss_b:>12.1f} {heap_b:>10.1f}")
    for mode in ("default", "bounded"):
        (rss0, heap0), (rss1, heap1) = results[mode][0], results[mode][-1]
        print(f"{mode}: pass 1 -> {args.passes}: RSS {rss1 - rss0:+.1f} MiB, live heap {heap1 - heap0:+.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
