"""Where an engine step's time goes: the offline engine's steps at a fixed number of decoding sequences, split into
the model's parts (attention, MoE and norms of all layers, the lm_head) and the rest of the step.

    .venv/bin/python benchmarks/decode_breakdown.py [--concurrency 1 8 32] [--steps 48] [--model DIR]

Each part is timed by wrapping its module's forward (wall time, ms per step; the parts nest inside "model
forward"). The read bandwidth measured just before each run (as throughput.py measures it) gives the step's
roofline share: the weights a step reads over that bandwidth. A step of several sequences reads the distinct experts
its tokens were routed to, counted over the steps right after the timed ones (the routing recomputed from the
router's logits, as the layer computes it); the KV cache's reads are left out (under 1% of a step's bytes at 128-160
tokens of context). Run it on a quiet machine: a second busy process stalls every parallel region.

`--pairs N` then measures the batch-1 share N more times, each from a bandwidth sum taken right before 16 steps,
and prints every pair and the median share: on a VM whose bandwidth moves by 2x within minutes, one bandwidth
figure for a whole run can land in another spell than the steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from throughput import DEFAULT_MODEL, decode_bytes_per_token, machine, read_bandwidth  # noqa: E402

from s1serve import LLM, SamplingParams  # noqa: E402
from s1serve.layers import kernels  # noqa: E402
from s1serve.layers.moe import SparseMoE, select_experts  # noqa: E402

COUNTED_STEPS = 8  # steps after the timed ones whose routed experts are counted


def timed(spent: dict[str, float], label: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
    return wrapper


def counting_experts(model, counts: list[int]) -> Callable[[], None]:
    """Wraps each MoE layer's forward to record how many distinct experts the step's tokens were routed to there;
    returns what unwraps them."""
    wrapped = []
    for layer in model.layers:
        mlp = layer.mlp
        if not isinstance(mlp, SparseMoE):
            continue
        original = mlp.forward

        def counted(x, *args, mlp=mlp, original=original, **kwargs):
            ids, _ = select_experts(kernels.linear(x, mlp.gate.weight), mlp.top_k, mlp.num_groups, mlp.renormalize)
            counts.append(ids.unique().numel())
            return original(x, *args, **kwargs)

        mlp.forward = counted
        wrapped.append((mlp, original))
    return lambda: [setattr(mlp, "forward", original) for mlp, original in wrapped]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed per concurrency")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=0, help="batch-1 (bandwidth, 16 steps) pairs after the table")
    args = parser.parse_args()
    llm = LLM(args.model, dtype="bfloat16", skip_tokenizer_init=True)
    engine, model = llm.engine, llm.engine.runner.model
    spent: dict[str, float] = defaultdict(float)
    model.forward = timed(spent, "model forward", model.forward)
    model.compute_logits = timed(spent, "lm_head (logits)", model.compute_logits)
    for layer in model.layers:
        layer.self_attn.forward = timed(spent, "  attention", layer.self_attn.forward)
        layer.mlp.forward = timed(spent, "  MoE", layer.mlp.forward)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = timed(spent, "  layer norms", norm.forward)
    weight_bytes = decode_bytes_per_token(model)
    print(f"machine: {machine()}")
    for c in args.concurrency:
        params = SamplingParams(temperature=0, max_tokens=args.steps + COUNTED_STEPS + 4, ignore_eos=True)
        for i in range(c):
            engine.add_request(f"c{c}-{i}", [1000 + 7 * i + j for j in range(args.input_len)], params)
        for _ in range(3):  # the prefill and the first decode steps
            engine.step()
        bandwidth = read_bandwidth(5)
        spent.clear()
        steps, start = 0, time.perf_counter()
        while engine.has_unfinished_requests() and steps < args.steps:
            engine.step()
            steps += 1
        step = (time.perf_counter() - start) / steps
        parts = dict(spent)
        counts: list[int] = []
        unwrap = counting_experts(model, counts)
        for _ in range(COUNTED_STEPS):
            engine.step()
        unwrap()
        while engine.has_unfinished_requests():
            engine.step()
        experts = sum(counts) / len(counts)
        share = decode_bytes_per_token(model, experts) / bandwidth / step
        print(f"\n{c} decoding: {step * 1e3:.1f} ms per step at {bandwidth / 1e9:.1f} GB/s, {share:.0%} of the roofline"
              f" ({experts:.1f} experts a layer)")
        for label, seconds in parts.items():
            print(f"  {label:<20}{seconds / steps * 1e3:8.2f} ms")
        rest = step - (parts["model forward"] + parts["lm_head (logits)"]) / steps
        print(f"  {'rest of the step':<20}{rest * 1e3:8.2f} ms")
    if args.pairs:
        roofline_pairs(engine, weight_bytes, args.pairs, args.input_len)


def roofline_pairs(engine, weight_bytes: int, pairs: int, input_len: int, steps: int = 16) -> None:
    """Batch-1 roofline shares, each from a bandwidth sum and the decode steps right after it."""
    engine.add_request("pairs", [1000 + j for j in range(input_len)],
                       SamplingParams(temperature=0, max_tokens=pairs * (steps + 1) + 4, ignore_eos=True))
    for _ in range(3):
        engine.step()
    shares = []
    print(f"\n1 decoding, {pairs} pairs of (bandwidth, {steps} steps):")
    for _ in range(pairs):
        bandwidth = read_bandwidth(3)
        engine.step()  # the first step after the sum reads weights the sum evicted
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step = (time.perf_counter() - start) / steps
        shares.append(weight_bytes / bandwidth / step)
        print(f"  {step * 1e3:6.2f} ms per step at {bandwidth / 1e9:5.1f} GB/s: {shares[-1]:.0%}")
    print(f"  median {statistics.median(shares):.0%} of the roofline (range {min(shares):.0%}-{max(shares):.0%})")
    engine.abort("pairs")


if __name__ == "__main__":
    main()
