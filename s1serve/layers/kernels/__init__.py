"""Optional CPU kernels: bf16 matmuls with AVX512-BF16 (`bf16_matmul.cpp`), compiled on first use; FP8 weights with
bf16 activations through the same kernel (`fp8.py`, re-exported here); the small per-layer steps fused into single
calls (`fused_ops.cpp`, see fused_ops below).

Why by hand: for the few rows of a decode step oneDNN's bf16 GEMM reads weights at well under the memory bandwidth
(`benchmarks/cpu_matmul.py` has the side-by-side figures). The kernel works on weights packed for it once, when a
ModelRunner takes the model (`pack_weights`): a packed weight is recognised by its shape ([N/64, K/2, 64, 2], or
[E, N/64, K/2, 64, 2] for stacked experts), and every call with it goes through the kernel, whatever the number of
rows. The kernel is row-invariant, so batching never changes a sequence's result.

Weights stay unpacked, and take PyTorch, where the kernel does not apply: float32 or other devices, a CPU without
AVX512-BF16, output features not a multiple of 64, a failed build, or S1SERVE_CPU_KERNELS=0.

Where the CPU has AMX-BF16 the kernel runs every call on the tile unit instead of AVX-512 (same packed weights; see
the source): prefill and batched decode steps stop being bound by AVX-512's multiply rate. S1SERVE_CPU_AMX=0 keeps
AVX-512. The two round differently, so the choice is made once per process, when the kernels load.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger("s1serve.kernels")
SOURCES = [Path(__file__).with_name(name) for name in ("bf16_matmul.cpp", "fused_ops.cpp", "fused_blocks.cpp")]
KERNEL_NAME = "s1serve_bf16_matmul"
ENV_SWITCH = "S1SERVE_CPU_KERNELS"
AMX_SWITCH = "S1SERVE_CPU_AMX"
BLOCK_N = 64  # output columns per packed block (bf16_matmul.cpp)
EXTRA_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_flags()


def cpu_has_amx_bf16() -> bool:
    return {"amx_bf16", "amx_tile"} <= cpu_flags()


@functools.cache
def bf16_kernels() -> ModuleType | None:
    """The compiled extension, or None where it cannot be used (the reason is logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if not cpu_has_avx512_bf16():
        log.info("CPU has no AVX512-BF16: bf16 matmuls use PyTorch")
        return None
    from torch.utils.cpp_extension import load

    try:
        import ninja  # the build tool torch's extension builder calls, from the venv when not on PATH

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:
        pass
    built = _built_module()
    if built is not None and is_stale(built, SOURCES):  # a first run would otherwise look hung
        log.warning("compiling the CPU kernels for this machine (once, about a minute; kept in %s)", built.parent)
    try:
        module = load(
            name=KERNEL_NAME,
            sources=[str(source) for source in SOURCES],
            extra_cflags=EXTRA_CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja: run, slower, on PyTorch
        log.warning("could not build the CPU bf16 kernels (%s): bf16 matmuls use PyTorch", exc)
        return None
    wanted = cpu_has_amx_bf16() and os.environ.get(AMX_SWITCH, "1") != "0"
    if module.set_amx(wanted) != wanted:
        log.warning("the OS refused the AMX tile state: bf16 matmuls use AVX-512")
    return module


def _built_module() -> Path | None:
    """Where torch's extension builder keeps the compiled module (None if its private helper has moved)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(KERNEL_NAME, verbose=False)) / f"{KERNEL_NAME}.so"
    except (ImportError, AttributeError, OSError):
        return None


def is_stale(built: Path, sources: list[Path]) -> bool:
    """Whether loading will compile: no module yet, or a source newer than it."""
    return not built.exists() or built.stat().st_mtime < max(source.stat().st_mtime for source in sources)


def cpu_kernels(device: torch.device) -> ModuleType | None:
    """The compiled module for tensors on `device`: on the CPU where it was built, else None."""
    return bf16_kernels() if device.type == "cpu" else None


def fused_ops(x: torch.Tensor) -> ModuleType | None:
    """The compiled fused per-layer ops (`fused_ops.cpp`: RMSNorm, routing, SwiGLU's product, the experts' weighted
    sum) where they take x, bf16 on the CPU with the kernels built; else None, and the caller runs its PyTorch ops."""
    return cpu_kernels(x.device) if x.dtype == torch.bfloat16 else None


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [..., N, K] in the kernel's layout [..., N/64, K/2, 64, 2], or None where the kernel does not apply."""
    *lead, n, k = weight.shape
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.bfloat16
        or n % BLOCK_N
        or k % 2
        or bf16_kernels() is None
    ):
        return None
    blocks = weight.reshape(*lead, n // BLOCK_N, BLOCK_N, k // 2, 2)
    return blocks.transpose(-3, -2).contiguous()


def pack_weights(model: nn.Module, activation_dtype: torch.dtype) -> None:
    """Packs, in place, where the kernel applies, the weights that modules list in `packable_weights` (dotted names)
    and the (weight, scale) pairs they list in `packable_fp8_weights` (FP8 packing depends on the activations' dtype,
    which FP8 weights do not tell)."""
    for module in model.modules():
        for name in getattr(module, "packable_weights", ()):
            owner, leaf = _owner(module, name)
            weight = getattr(owner, leaf)
            if is_packed(weight):
                continue
            layout = pack(weight.data)
            if layout is not None:
                setattr(owner, leaf, nn.Parameter(layout, requires_grad=False))
        for weight_name, scale_name in getattr(module, "packable_fp8_weights", ()):
            weight_owner, weight_leaf = _owner(module, weight_name)
            scale_owner, scale_leaf = _owner(module, scale_name)
            weight = getattr(weight_owner, weight_leaf)
            if is_fp8_packed(weight):
                continue
            layouts = pack_fp8(weight.data, getattr(scale_owner, scale_leaf).data, activation_dtype)
            if layouts is not None:
                setattr(weight_owner, weight_leaf, nn.Parameter(layouts[0], requires_grad=False))
                setattr(scale_owner, scale_leaf, nn.Parameter(layouts[1], requires_grad=False))


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding the dotted attribute `name`, and the attribute's own name."""
    owner_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), leaf


def is_packed(weight: torch.Tensor) -> bool:
    return weight.dim() in (4, 5) and weight.shape[-1] == 2 and weight.shape[-2] == BLOCK_N


def _rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] times weight [N, K] (or its packed layout) transposed -> [..., N] in out_dtype (default x's)."""
    out_dtype = out_dtype or x.dtype
    if weight.dim() != 4:
        return F.linear(x, weight).to(out_dtype)
    kernels = bf16_kernels()
    assert kernels is not None  # packed weights exist only where the kernels were built
    out = kernels.linear(_rows(x), weight, out_dtype == torch.bfloat16)
    return out.view(*x.shape[:-1], weight.shape[0] * BLOCK_N).to(out_dtype)


def linears(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x [T, K] bf16 times several packed bf16 weights [N_i, K] -> [T, sum N_i] bf16, their outputs side by side,
    in one call (each part equal to `linear`'s)."""
    kernels = bf16_kernels()
    assert kernels is not None  # packed weights exist only where the kernels were built
    return kernels.linears(_rows(x), weights)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Row segment e of x (rows ends[e-1]..ends[e]) times weight[e]^T; weight [E, N, K] or packed; out [rows, N]."""
    if weight.dim() == 5:
        kernels = bf16_kernels()
        assert kernels is not None
        return kernels.grouped_linear(_rows(x), weight, ends.to(torch.long), True)
    weight_t = weight.transpose(1, 2)
    align = 16 // x.element_size()
    if x.shape[-1] % align == 0 and weight_t.shape[-1] % align == 0 and x.dtype in (torch.float32, torch.bfloat16):
        return torch._grouped_mm(x, weight_t, offs=ends.to(torch.int32))
    # torch._grouped_mm needs 16-byte aligned rows; odd shapes take one matmul per non-empty expert.
    out = x.new_empty(x.shape[0], weight_t.shape[-1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight_t[expert]
        start = end
    return out


# FP8 weights build on the above (the kernels, `_rows`), so they come last.
from s1serve.layers.kernels.fp8 import (  # noqa: E402
    cpu_has_avx512_vbmi,
    fp8_grouped_linear,
    fp8_kernels,
    fp8_linear,
    is_fp8_packed,
    pack_fp8,
)

__all__ = [
    "bf16_kernels", "cpu_flags", "cpu_has_amx_bf16", "cpu_has_avx512_bf16", "cpu_has_avx512_vbmi", "cpu_kernels",
    "fp8_grouped_linear", "fp8_kernels", "fp8_linear", "fused_ops", "grouped_linear", "is_fp8_packed", "is_packed",
    "is_stale", "linear", "linears", "pack", "pack_fp8", "pack_weights",
]
