"""bf16 matmuls on CPU: s1serve's AVX512-BF16 kernel against PyTorch (oneDNN), side by side in one run.

    .venv/bin/python benchmarks/cpu_matmul.py [--rows 1 4 8 64 256]

Shapes are the bench preset's (hidden 1024): the lm_head over the real vocabulary, an attention projection, one
expert's gate+up and down, and the grouped experts of a step (64 experts, top-8: 8 x rows routed rows over the
experts, as the router spreads them). The kernel runs on weights packed once (as the engine does); PyTorch on the
plain [N, K] weight. Prints the best ms per call, the weight read rate (GB/s) and the ratio. Small weights stay in
cache between calls, so their GB/s overstate what a forward (which streams them from memory) sees.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from s1serve.layers import kernels  # noqa: E402

LINEARS = {"lm_head": (155008, 1024), "q_proj": (1024, 1024), "expert w13": (768, 1024), "expert w2": (1024, 384)}
EXPERTS, TOP_K = 64, 8


def best_seconds(fn, budget_s: float = 0.5) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 64, 256, 2048])
    args = parser.parse_args()
    if kernels.bf16_kernels() is None:
        sys.exit("the bf16 kernels are not available on this machine")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'shape':<24}{'rows':>6}{'torch ms':>10}{'GB/s':>7}{'kernel ms':>11}{'GB/s':>7}{'ratio':>8}")
    gen = torch.Generator().manual_seed(0)
    for name, (n, k) in LINEARS.items():
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        packed = kernels.pack(w)
        for rows in args.rows:
            if name == "lm_head" and rows > 256:  # it only sees the last token of each sequence
                continue
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            a = best_seconds(lambda: F.linear(x, w))
            b = best_seconds(lambda: kernels.linear(x, packed, torch.float32))
            print(f"{name + f' {n}x{k}':<24}{rows:>6}{a * 1e3:>10.3f}{w.nbytes / a / 1e9:>7.1f}"
                  f"{b * 1e3:>11.3f}{w.nbytes / b / 1e9:>7.1f}{a / b:>7.2f}x")
    w13 = torch.randn(EXPERTS, 768, 1024, generator=gen).to(torch.bfloat16)
    w13_packed = kernels.pack(w13)
    for rows in args.rows:
        routed = torch.randint(0, EXPERTS, (rows * TOP_K,), generator=gen)
        ends = torch.cumsum(torch.bincount(routed, minlength=EXPERTS), 0)
        x = torch.randn(rows * TOP_K, 1024, generator=gen).to(torch.bfloat16)
        touched = int((torch.bincount(routed, minlength=EXPERTS) > 0).sum()) * w13[0].nbytes
        a = best_seconds(lambda: torch._grouped_mm(x, w13.transpose(1, 2), offs=ends.to(torch.int32)))
        b = best_seconds(lambda: kernels.grouped_linear(x, w13_packed, ends))
        print(f"{'grouped w13 64x768x1024':<24}{rows:>6}{a * 1e3:>10.3f}{touched / a / 1e9:>7.1f}"
              f"{b * 1e3:>11.3f}{touched / b / 1e9:>7.1f}{a / b:>7.2f}x")


if __name__ == "__main__":
    main()
