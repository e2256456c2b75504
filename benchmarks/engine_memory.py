"""Engine memory under a repeated workload: does resident memory grow per request, or per new shape?

    .venv/bin/python benchmarks/engine_memory.py [--model PATH] [--rounds 12] [--passes 3] [--seed 0]

The offline engine (`s1serve.LLM`, in this process) runs --passes passes of the same --rounds rounds of chat
requests: each round a batch of 1-12 conversations of random length and 8-64 new tokens, fixed by --seed, so every
pass brings the same batch shapes again. After each round it prints the process's RSS, the glibc heap's share of
it ([heap] in /proc/self/smaps) and the number of objects the garbage collector tracks; at the end, each pass's
growth. Memory that grows in the first pass and not in the next ones is held per shape met (allocator high-water
marks, kernels' per-shape caches); memory that grows in every pass would be held per request (a leak).

It explains what benchmarks/soak.py sees: the engine process's RSS rises while new batch shapes keep arriving, ever
more slowly, and the API server's stays flat.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
from pathlib import Path

from s1serve import LLM, SamplingParams
from s1serve.checkpoint.tiny import write_tiny_checkpoint

DEFAULT_MODEL = Path(os.environ.get("S1SERVE_CACHE", Path.home() / ".cache" / "s1serve")) / "soak-tiny-seed0"
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "sigma")


def resident_mib() -> tuple[float, float]:
    """(RSS, the part of it in the glibc heap) of this process, MiB."""
    total = heap = 0
    region = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            region = fields[5] if len(fields) > 5 else ""
        elif fields[0] == "Rss:":
            total += int(fields[1])
            heap += int(fields[1]) if region == "[heap]" else 0
    return total / 1024, heap / 1024


def one_round(llm: LLM, rng: random.Random) -> None:
    conversations, params = [], []
    for _ in range(rng.randint(1, 12)):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
        conversations.append([{"role": "user", "content": text}])
        params.append(SamplingParams(max_tokens=rng.randint(8, 64), temperature=0.8, seed=rng.randint(0, 1 << 30)))
    llm.chat(conversations, params, use_tqdm=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint (the tiny preset if missing)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds per pass")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        write_tiny_checkpoint(args.model, "tiny", 0)
    llm = LLM(str(args.model))
    growth = []
    for p in range(args.passes):
        rng = random.Random(args.seed)  # every pass: the same requests, so the same batch shapes
        start, _ = resident_mib()
        for r in range(args.rounds):
            one_round(llm, rng)
            gc.collect()
            rss, heap = resident_mib()
            print(f"pass {p + 1} round {r + 1:3d}: rss {rss:7.1f} MiB, heap {heap:7.1f} MiB, "
                  f"gc objects {len(gc.get_objects())}", flush=True)
        growth.append(rss - start)
    print("growth per pass (MiB): " + ", ".join(f"{g:+.1f}" for g in growth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
