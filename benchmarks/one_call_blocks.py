"""Decode steps with attention and the MoE in one call each (`attention_block`, `moe_block`) against the same steps
call by call, alternating in one process.

    .venv/bin/python benchmarks/one_call_blocks.py [--model DIR] [--concurrency 1 8] [--pairs 40] [--steps 8]

Both sides run the same compiled kernels on the same weights and caches, with the same results (the tests compare
them bitwise); they differ only in the Python between the calls. Each pair times --steps decode steps with the one-call
blocks and --steps without (the order flipped every pair, one untimed step after each switch), so a slow spell of the
machine falls on both sides. Prints the median of the pairs' ratios (call by call / one call: above 1, the blocks
are faster), how many pairs the blocks won, and each side's median step. On the tiny preset (`--model` a `make-tiny`
checkpoint) the weights stay in cache and the step is mostly that Python; on the bench preset it is mostly memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import DEFAULT_MODEL, machine  # noqa: E402

from s1serve import LLM, SamplingParams  # noqa: E402
from s1serve.layers.attention import Attention  # noqa: E402
from s1serve.layers.moe import SparseMoE  # noqa: E402

BLOCK_CHECKS = {Attention: Attention._block_applies, SparseMoE: SparseMoE._block_applies}


def use_blocks(on: bool) -> None:
    for cls, check in BLOCK_CHECKS.items():
        cls._block_applies = check if on else (lambda *_: False)


def timed_steps(engine, steps: int) -> float:
    engine.step()  # the first step after a switch
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per side of a pair")
    parser.add_argument("--input-len", type=int, default=128)
    args = parser.parse_args()
    llm = LLM(args.model, dtype="bfloat16", skip_tokenizer_init=True)
    engine = llm.engine
    print(f"machine: {machine()}\nmodel: {args.model}")
    # every position stays below the attention kernel's bound (1024), where the one-call attention applies
    max_tokens = args.pairs * 2 * (args.steps + 1) + 8
    if args.input_len + max_tokens >= 1024:
        parser.error("--input-len + the pairs' steps must stay below 1024 positions")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for c in args.concurrency:
        for i in range(c):
            engine.add_request(f"c{c}-{i}", [1000 + 7 * i + j for j in range(args.input_len)], params)
        for _ in range(3):
            engine.step()
        ratios, blocks, calls = [], [], []
        for pair in range(args.pairs):
            seconds = {}
            for on in ((True, False) if pair % 2 else (False, True)):
                use_blocks(on)
                seconds[on] = timed_steps(engine, args.steps)
            ratios.append(seconds[False] / seconds[True])
            blocks.append(seconds[True])
            calls.append(seconds[False])
        use_blocks(True)
        for i in range(c):
            engine.abort(f"c{c}-{i}")
        won = sum(r > 1 for r in ratios)
        print(f"{c} decoding: call by call / one call, median of {args.pairs} pairs {statistics.median(ratios):.3f}x "
              f"(one call faster in {won}); median step {statistics.median(blocks) * 1e3:.2f} ms with the blocks, "
              f"{statistics.median(calls) * 1e3:.2f} ms call by call")


if __name__ == "__main__":
    main()
