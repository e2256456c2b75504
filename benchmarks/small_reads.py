"""How fast this machine reads a weight in the pieces a decode step reads it in: the bf16 kernel's one-row `linear`
over many distinct packed weights of one size, on huge pages and on malloc'd memory (4 KiB pages where transparent
huge pages are `madvise`, the common setting), torch's sum over buffers of the same size, and one sum over all of
them (the roofline's kind of read), in one process.

    .venv/bin/python benchmarks/small_reads.py [--sizes 256 384 1024 1536 4096 16384] [--total-mib 400] [--rounds 5]

A size is a weight's output columns at K = 1024 (256: k_proj or v_proj of the bench preset, 0.5 MiB; 384: one
expert's down projection, 0.75 MiB; 1024: o_proj, 2 MiB; 1536: q/k/v together, 3 MiB; 16384: 32 MiB). Each piece is
read once per pass over --total-mib of copies, so none is in cache when read. Prints GB/s, the median of the rounds,
for each kind of read: if the sum over pieces of a size is already well below the one big sum, a step made of such
calls cannot reach the big sum's rate whatever its kernel does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import machine  # noqa: E402

from s1serve.engine.host_memory import huge_page_empty  # noqa: E402
from s1serve.layers import kernels  # noqa: E402

K = 1024


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 1024, 1536, 4096, 16384])
    parser.add_argument("--total-mib", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if kernels.bf16_kernels() is None:
        sys.exit("the bf16 kernels do not run on this CPU (no AVX512-BF16)")
    print(f"machine: {machine()}")
    x = torch.randn(1, K, dtype=torch.bfloat16)
    for n in args.sizes:
        if n % kernels.BLOCK_N:
            parser.error(f"size {n} is no multiple of {kernels.BLOCK_N}")
        piece = n * K * 2
        count = max(4, (args.total_mib << 20) // piece)
        weights = huge_page_empty((count, n // kernels.BLOCK_N, K // 2, kernels.BLOCK_N, 2), torch.bfloat16)
        weights.fill_(0.01)
        as_float = weights.view(count, -1).view(torch.float32)
        pieces = [weights[i] for i in range(count)]
        on_small_pages = [torch.full_like(w, 0.01, memory_format=torch.contiguous_format) for w in pieces]  # malloc'd
        rates: dict[str, list[float]] = {"linear": [], "linear, 4 KiB pages": [], "sum of pieces": [], "one sum": []}
        for _ in range(args.rounds + 1):  # the first pass only touches everything once
            rates["linear"].append(piece * count / seconds(lambda: [kernels.linear(x, w) for w in pieces]))
            rates["linear, 4 KiB pages"].append(
                piece * count / seconds(lambda: [kernels.linear(x, w) for w in on_small_pages]))
            rates["sum of pieces"].append(piece * count / seconds(lambda: [as_float[i].sum() for i in range(count)]))
            rates["one sum"].append(piece * count / seconds(as_float.sum))
        line = ", ".join(f"{kind} {statistics.median(r[1:]) / 1e9:5.1f}" for kind, r in rates.items())
        print(f"{n:6d} columns ({piece / 2**20:5.2f} MiB, {count} copies), GB/s: {line}", flush=True)


if __name__ == "__main__":
    main()
