"""FP8 weight-only matmuls (W8A16): float8_e4m3fn weights with segmented 128 x 128 block scales
(s1serve.checkpoint.fp8), activations in bf16 or float32.

Why a kernel: a decode step reads every weight once, so reading 1 byte a weight instead of bf16's 2 halves its time.
On CPU the bf16 kernel (`bf16_matmul.cpp`) decodes FP8 in registers to exactly dequantize's bf16 values and sums
them in its own order, so its results are bitwise those of the bf16 kernel on the dequantized weight, row-invariant
as it is. It needs AVX512-VBMI besides AVX512-BF16, bf16 activations, and every 64-column block inside one 128-row
scale block (N/S a multiple of 64); `pack_fp8` packs for it once, and a packed weight (uint8 [..., N/64, K/2, 128],
with float32 scales [..., N/64, ceil(K/128)]) always goes to it. On sm90 GPUs `fp8_linear` runs torch's
block-scaled FP8 GEMM. Everywhere else the weight is dequantized for each call and multiplied by PyTorch.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch.nn import functional as F

from s1serve.checkpoint.fp8 import BLOCK, FP8_DTYPE, FP8_MAX, dequantize
from s1serve.layers.kernels import BLOCK_N, _rows, bf16_kernels, cpu_flags, grouped_linear

log = logging.getLogger("s1serve.kernels")


def cpu_has_avx512_vbmi() -> bool:
    return "avx512vbmi" in cpu_flags()


@functools.cache
def fp8_kernels() -> ModuleType | None:
    """The compiled extension where its FP8 functions can run (they also need AVX512-VBMI), else None."""
    kernels = bf16_kernels()
    if kernels is not None and not cpu_has_avx512_vbmi():
        log.info("CPU has no AVX512-VBMI: FP8 matmuls dequantize for PyTorch")
        return None
    return kernels


def is_fp8_packed(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.uint8 and weight.dim() in (3, 4) and weight.shape[-1] == 2 * BLOCK_N


def pack_fp8(
    weight: torch.Tensor, scale: torch.Tensor, activation_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """weight [..., N, K] fp8 and its scales [..., S, NB, KB] in the kernel's layouts, or None where it does not apply.

    Weight bytes [..., N/64, K/2, 128]: the bf16 kernel's [64 columns x 2 k] of a k pair, as (vector v, half h,
    128-bit lane L, column c, k e) = column 32v + 16h + 4L + c, reordered to (v, L, h, c, e), so that a 64-byte
    vector's unpacklo/hi of its looked-up bytes gives the bf16 layout's vectors 2v and 2v + 1. Scales
    [..., N/64, KB]: the scale of each 64-column block."""
    *lead, n, k = weight.shape
    segments = scale.shape[-3]
    if (
        weight.device.type != "cpu"
        or weight.dtype != FP8_DTYPE
        or activation_dtype != torch.bfloat16
        or n % segments
        or (n // segments) % BLOCK_N
        or k % 2
        or fp8_kernels() is None
    ):
        return None
    pairs = weight.view(torch.uint8).reshape(*lead, n // BLOCK_N, BLOCK_N, k // 2, 2).transpose(-3, -2)
    d = len(lead) + 2  # the first of the (v, h, L, c, e) dims
    lanes = pairs.reshape(*lead, n // BLOCK_N, k // 2, 2, 2, 4, 4, 2).permute(*range(d), d, d + 2, d + 1, d + 3, d + 4)
    rows = torch.arange(0, n, BLOCK_N)
    block_scales = scale[..., rows // (n // segments), rows % (n // segments) // BLOCK, :]
    return lanes.reshape(*lead, n // BLOCK_N, k // 2, 2 * BLOCK_N).contiguous(), block_scales.float().contiguous()


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x [..., K] times the FP8 weight [N, K] (scales [S, NB, KB]; or both packed) transposed -> [..., N] in
    out_dtype (default x's)."""
    out_dtype = out_dtype or x.dtype
    if is_fp8_packed(weight):
        kernels = fp8_kernels()
        assert kernels is not None  # packed weights exist only where the kernels run
        out = kernels.fp8_linear(_rows(x), weight, scale, out_dtype == torch.bfloat16)
        return out.view(*x.shape[:-1], weight.shape[0] * BLOCK_N).to(out_dtype)
    if x.device.type == "cuda" and out_dtype == torch.bfloat16 and cuda_block_fp8_applies(weight, scale):
        return cuda_fp8_linear(x, weight, scale, out_dtype)
    return F.linear(x, dequantize(weight, scale, x.dtype)).to(out_dtype)


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Row segment e of x (rows ends[e-1]..ends[e]) times expert e's FP8 weight [E, N, K] (scales [E, S, NB, KB];
    or both packed) transposed -> [rows, N] in x's dtype."""
    if is_fp8_packed(weight):
        kernels = fp8_kernels()
        assert kernels is not None
        return kernels.fp8_grouped_linear(_rows(x), weight, scale, ends.to(torch.long), x.dtype == torch.bfloat16)
    # Dequantize only the experts with rows (of hundreds): dropping empty segments leaves the others' ends unchanged.
    used = torch.nonzero(torch.diff(ends, prepend=ends.new_zeros(1))).flatten()
    if used.numel() == 0:
        return x.new_empty(x.shape[0], weight.shape[1])
    return grouped_linear(x, dequantize(weight[used], scale[used], x.dtype), ends[used])


def cuda_block_fp8_applies(weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether torch's block-scaled FP8 GEMM takes this weight: sm90 (the only arch it has 128 x 128 weight scales
    for), whole 128 x 128 blocks, each segment a whole number of them. (Its output is bf16: fp8_linear checks.)"""
    n, k = weight.shape
    return (
        weight.dtype == FP8_DTYPE
        and hasattr(F, "scaled_mm")
        and torch.cuda.get_device_capability(weight.device) == (9, 0)
        and k % BLOCK == 0
        and (n // scale.shape[0]) % BLOCK == 0
    )


def quantize_1x128(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [M, K] -> fp8 [M, K] and one float32 scale per row and 128 columns [M, K/128]: amax / 448, so each group
    uses the whole fp8 range (K a multiple of 128)."""
    m, k = rows.shape
    groups = rows.float().view(m, k // BLOCK, BLOCK)
    scales = groups.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    q = (groups / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, k), scales


def cuda_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_linear on sm90 with F.scaled_mm: x quantized per token and 128 columns (BlockWise1x128), the weight with
    its own 128 x 128 scales (BlockWise128x128). Unverified here (no GPU): a device script should compare it with
    the dequantize path before production relies on it."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    rows = F.pad(rows, (0, 0, 0, -m % 4))  # the 1x128 scales, M-major, need 16-byte aligned columns
    q, x_scales = quantize_1x128(rows)
    kb = k // BLOCK
    w_scales = F.pad(scale.float().reshape(-1, kb), (0, -kb % 4))  # [N/128, KB padded to 4]; passed K-major
    out = F.scaled_mm(
        q, weight.t(), x_scales.t().contiguous().t(), F.ScalingType.BlockWise1x128,
        w_scales.t(), F.ScalingType.BlockWise128x128, output_dtype=out_dtype,
    )
    return out[:m].view(*x.shape[:-1], weight.shape[0])
