"""bf16 matmuls on CPU: s1serve's kernel (AVX-512 and AMX paths) against PyTorch (oneDNN), side by side in one run.

    .venv/bin/python benchmarks/cpu_matmul.py [--rows 1 4 8 64 256] [--fp8-rows 1 8 64 256] [--sections bf16 fp8]

Shapes are the bench preset's (hidden 1024): the lm_head over the real vocabulary, an attention projection, one
expert's gate+up and down, and the grouped experts of a step (64 experts, top-8: 8 x rows routed rows over the
experts, as the router spreads them). The kernel runs on weights packed once (as the engine does), on AVX-512 and,
where the CPU has AMX-BF16, on the AMX tiles; PyTorch on the plain [N, K] weight. Prints the best ms per call, the
weight read rate (GB/s) and PyTorch's time over each path's. Small weights stay in
cache between calls, so their GB/s overstate what a forward (which streams them from memory) sees.

The FP8 section (block-scaled float8_e4m3fn weights, bf16 activations; the lm_head stays bf16) puts the bf16 kernel
on the dequantized weights, the FP8 kernel and the FP8 PyTorch fallback (dequantize per call) side by side, on the
attention q and k/v projections and the grouped experts' gate+up and down. Each call takes the next of enough
copies of the weights (--stream-mb of fp8, several times the L3 cache) that they stream from memory, as in a
forward: FP8 reads half the bytes, so fp8/bf16 tends to 0.5 where reading the weight is the cost.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from s1serve.checkpoint.fp8 import FP8_DTYPE, blocks, dequantize  # noqa: E402
from s1serve.layers import kernels  # noqa: E402

LINEARS = {"lm_head": (155008, 1024), "q_proj": (1024, 1024), "expert w13": (768, 1024), "expert w2": (1024, 384)}
EXPERTS, TOP_K = 64, 8
FP8_LINEARS = {"q_proj": (1024, 1024), "kv_proj": (256, 1024)}
FP8_EXPERTS = {"w13": (768, 1024, 2), "w2": (1024, 384, 1)}  # output features, input features, scale segments


def best_seconds(fn, budget_s: float = 0.5) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def kernel_paths() -> list[str]:
    """The kernel's paths on this CPU: AVX-512, and the AMX tiles where it has them."""
    return ["avx512", "amx"] if kernels.cpu_has_amx_bf16() else ["avx512"]


def on_each_path(fn: Callable[[], object]) -> list[float]:
    """Best seconds of fn on each kernel path (the process's own path is restored after)."""
    module = kernels.bf16_kernels()
    before = module.amx()
    times = []
    try:
        for path in kernel_paths():
            if module.set_amx(path == "amx") != (path == "amx"):
                sys.exit("the OS refused the AMX tile state")
            times.append(best_seconds(fn))
    finally:
        module.set_amx(before)
    return times


def bf16_section(rows_list: list[int], gen: torch.Generator) -> None:
    paths = kernel_paths()
    print(f"{'shape':<24}{'rows':>6}{'torch ms':>10}{'GB/s':>7}"
          + "".join(f"{path + ' ms':>11}{'GB/s':>7}{'torch/' + path:>13}" for path in paths))

    def row(label: str, rows: int, nbytes: int, torch_s: float, kernel_s: list[float]) -> None:
        print(f"{label:<24}{rows:>6}{torch_s * 1e3:>10.3f}{nbytes / torch_s / 1e9:>7.1f}"
              + "".join(f"{k * 1e3:>11.3f}{nbytes / k / 1e9:>7.1f}{torch_s / k:>12.2f}x" for k in kernel_s))

    for name, (n, k) in LINEARS.items():
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        packed = kernels.pack(w)
        for rows in rows_list:
            if name == "lm_head" and rows > 256:  # it only sees the last token of each sequence
                continue
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            row(f"{name} {n}x{k}", rows, w.nbytes, best_seconds(lambda: F.linear(x, w)),
                on_each_path(lambda: kernels.linear(x, packed, torch.float32)))
    w13 = torch.randn(EXPERTS, 768, 1024, generator=gen).to(torch.bfloat16)
    w13_packed = kernels.pack(w13)
    for rows in rows_list:
        routed = torch.randint(0, EXPERTS, (rows * TOP_K,), generator=gen)
        ends = torch.cumsum(torch.bincount(routed, minlength=EXPERTS), 0)
        x = torch.randn(rows * TOP_K, 1024, generator=gen).to(torch.bfloat16)
        touched = int((torch.bincount(routed, minlength=EXPERTS) > 0).sum()) * w13[0].nbytes
        row("grouped w13 64x768x1024", rows, touched,
            best_seconds(lambda: torch._grouped_mm(x, w13.transpose(1, 2), offs=ends.to(torch.int32))),
            on_each_path(lambda: kernels.grouped_linear(x, w13_packed, ends)))


def random_fp8(shape: tuple[int, ...], segments: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fp8 codes (NaN codes made zero) and block scales, as a checkpoint's [..., N, K] weight and scales."""
    *lead, n, k = shape
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    scale = torch.rand(*lead, segments, blocks(n // segments), blocks(k), generator=gen) * 2e-3
    return codes.view(FP8_DTYPE), scale


def cycled(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One call that runs the next of `calls` each time: each copy of a weight in turn."""
    it = itertools.cycle(calls)
    return lambda: next(it)()


def fp8_section(rows_list: list[int], stream_mb: int, gen: torch.Generator) -> None:
    print(f"\nFP8 weights, bf16 activations, streamed from memory ({stream_mb} MB of fp8 copies per shape)")
    print(f"{'fp8 shape':<26}{'rows':>6}{'bf16 ms':>9}{'GB/s':>7}{'fp8 ms':>9}{'GB/s':>7}{'fallback ms':>13}"
          f"{'fp8/bf16':>10}")
    shapes = {name: ((n, k), 1) for name, (n, k) in FP8_LINEARS.items()}
    shapes |= {f"grouped {name}": ((EXPERTS, n, k), s) for name, (n, k, s) in FP8_EXPERTS.items()}
    for name, (shape, segments) in shapes.items():
        copies = math.ceil(stream_mb * 2**20 / math.prod(shape))
        weights = [random_fp8(shape, segments, gen) for _ in range(copies)]
        bf16_packed = [kernels.pack(dequantize(w, s, torch.bfloat16)) for w, s in weights]
        fp8_packed = [kernels.pack_fp8(w, s, torch.bfloat16) for w, s in weights]
        label = f"{name} {'x'.join(map(str, shape))}"
        for rows in rows_list:
            x = torch.randn(rows if len(shape) == 2 else rows * TOP_K, shape[-1], generator=gen).to(torch.bfloat16)
            if len(shape) == 2:
                read = math.prod(shape)  # fp8 bytes
                a = best_seconds(cycled([lambda w=w: kernels.linear(x, w) for w in bf16_packed]))
                b = best_seconds(cycled([lambda w=w: kernels.fp8_linear(x, *w) for w in fp8_packed]))
                c = best_seconds(cycled([lambda w=w: kernels.fp8_linear(x, *w) for w in weights]))
            else:  # each call: the next copy, and a routing of its own (the same experts are not hit in turn)
                counts = [torch.bincount(torch.randint(0, EXPERTS, (rows * TOP_K,), generator=gen), minlength=EXPERTS)
                          for _ in range(4 * copies)]
                ends = [torch.cumsum(c, 0) for c in counts]
                read = sum(int((c > 0).sum()) for c in counts) * shape[-2] * shape[-1] // len(counts)
                a = best_seconds(cycled([lambda w=bf16_packed[i % copies], e=e: kernels.grouped_linear(x, w, e)
                                         for i, e in enumerate(ends)]))
                b = best_seconds(cycled([lambda w=fp8_packed[i % copies], e=e: kernels.fp8_grouped_linear(x, *w, e)
                                         for i, e in enumerate(ends)]))
                c = best_seconds(cycled([lambda w=weights[i % copies], e=e: kernels.fp8_grouped_linear(x, *w, e)
                                         for i, e in enumerate(ends)]))
            print(f"{label:<26}{rows:>6}{a * 1e3:>9.3f}{2 * read / a / 1e9:>7.1f}{b * 1e3:>9.3f}{read / b / 1e9:>7.1f}"
                  f"{c * 1e3:>13.3f}{b / a:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 64, 256, 2048])
    parser.add_argument("--fp8-rows", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--stream-mb", type=int, default=256, help="MB of fp8 weight copies cycled in the FP8 section")
    parser.add_argument("--sections", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"])
    args = parser.parse_args()
    if kernels.bf16_kernels() is None:
        sys.exit("the bf16 kernels are not available on this machine")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    if "bf16" in args.sections:
        bf16_section(args.rows, gen)
    if "fp8" in args.sections:
        if kernels.fp8_kernels() is None:
            sys.exit("the FP8 kernel is not available on this machine (it needs AVX512-VBMI too)")
        fp8_section(args.fp8_rows, args.stream_mb, gen)


if __name__ == "__main__":
    main()
