"""The CUDA FP8 path in one call on a GPU machine: correctness of the block-scaled FP8 GEMM against the dequantize
fallback, then its speed beside the fallback and a plain bf16 matmul of the same weights.

    python benchmarks/cuda_fp8.py            # on a machine with an sm90+ GPU and s1serve installed

Never run in CI (no GPU there). What it checks: for the published shapes (attention q_proj 8192x4096, an expert's
gate/up 1536x4096 and down 4096x1536) and 1 / 7 / 64 / 512 rows, `kernels.fp8_linear` on CUDA (the block-scaled
path where it applies) is within W8A8 rounding of `F.linear(x, dequantize(weight, scale))` — its activations are
quantised to FP8 per token in groups of 128, so it is not bitwise equal — printing the max relative error, then
median times over 50 calls of: the CUDA FP8 path, the dequantize fallback, bf16 `F.linear` on the dequantized
weight. Exit status 1 if the error exceeds the bound or the block-scaled path was not taken.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from s1serve.checkpoint.fp8 import dequantize, quantize_blocks  # noqa: E402
from s1serve.layers import kernels  # noqa: E402
from s1serve.layers.kernels.fp8 import cuda_block_fp8_applies  # noqa: E402

SHAPES = {"q_proj": (8192, 4096), "expert gate/up": (1536, 4096), "expert down": (4096, 1536)}
ROWS = (1, 7, 64, 512)
BOUND = 0.08  # relative (to the output's max) error allowed for FP8 activations against bf16 ones


def timed(fn, repeats: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, torch {torch.__version__}")
    failed = False
    gen = torch.Generator().manual_seed(0)
    print("| shape | rows | block path | max rel err | fp8 ms | fallback ms | bf16 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        values, scales = quantize_blocks(torch.randn(n, k, generator=gen) * 0.02)
        weight, scale = values.cuda(), scales[None].cuda()
        dense = dequantize(weight, scale, torch.bfloat16)
        block = cuda_block_fp8_applies(weight, scale)
        for rows in ROWS:
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16).cuda()
            got = kernels.fp8_linear(x, weight, scale)
            want = F.linear(x, dense)
            err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
            failed |= err > BOUND or not block
            print(f"| {name} {n}x{k} | {rows} | {block} | {err:.4f} | "
                  f"{timed(lambda: kernels.fp8_linear(x, weight, scale)):.4f} | "
                  f"{timed(lambda: F.linear(x, dequantize(weight, scale, torch.bfloat16))):.4f} | "
                  f"{timed(lambda: F.linear(x, dense)):.4f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
