"""The published FP8 weight format: float8_e4m3fn values in 128 x 128 blocks, one float32 scale per block.

A quantised linear `<module>.weight` [out, in] is stored with `<module>.weight_scale_inv`
[ceil(out/128), ceil(in/128)]; the real value is fp8 * scale (the name is historical: it multiplies). Edge blocks
are partial when a dimension is not a multiple of 128. With `scale_fmt: ue8m0` every scale is a power of two,
2^ceil(log2(amax/448)), so fp8 * scale is exact in bfloat16.

In memory s1serve keeps the weight as loaded (1 byte a value) and its scales in a segmented layout
[..., S, ceil((N/S)/128), ceil(K/128)] for a weight [..., N, K]: the N rows are S stacked segments of N/S rows,
each with its own 128-row blocks. A checkpoint tensor is one segment (S = 1); the MoE layer's fused gate+up weight
stacks two (gate rows, then up rows), whose blocks restart at the up rows even when the FFN width is not a
multiple of 128.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
BLOCK = 128  # rows and columns of one scale block (weight_block_size [128, 128], the only size supported)
SCALE_SUFFIX = "_scale_inv"  # `<module>.weight` -> `<module>.weight_scale_inv`


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def blocks(size: int) -> int:
    """Scale blocks along a dimension of `size` (the last one partial when size is not a multiple of 128)."""
    return math.ceil(size / BLOCK)


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint scale shape of a weight of `shape` [..., N, K]."""
    *lead, n, k = shape
    return (*lead, blocks(n), blocks(k))


def expand_scales(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Segmented block scales [..., S, NB, KB] -> one float32 scale per weight element [..., rows, cols]."""
    *lead, segments, nb, kb = scale.shape
    per_segment = rows // segments
    expanded = scale.float().repeat_interleave(BLOCK, dim=-2)[..., :per_segment, :]
    expanded = expanded.reshape(*lead, rows, kb)
    return expanded.repeat_interleave(BLOCK, dim=-1)[..., :cols]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [..., N, K] (float8_e4m3fn) times its segmented block scales [..., S, NB, KB] -> `dtype`.

    Computed in float32 and rounded once to `dtype`, so with power-of-two scales the result is exact in bfloat16."""
    rows, cols = weight.shape[-2:]
    return (weight.float() * expand_scales(scale, rows, cols)).to(dtype)


def quantize_blocks(weight: torch.Tensor, scale_fmt: str | None = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype) -> (float8_e4m3fn [N, K], float32 scales [ceil(N/128), ceil(K/128)]).

    Each block's amax maps to at most 448. With ue8m0 the scale is rounded up to a power of two (computed exactly
    with frexp, not log2, which can round an amax just above a power of two down onto it); an all-zero block gets
    scale 1 so that no scale is 0 or inf."""
    n, k = weight.shape
    nb, kb = blocks(n), blocks(k)
    padded = torch.nn.functional.pad(weight.float(), (0, kb * BLOCK - k, 0, nb * BLOCK - n))  # zeros: amax unchanged
    tiles = padded.view(nb, BLOCK, kb, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3))
    ratio = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
        scale = torch.ldexp(torch.ones_like(ratio), exponent - (mantissa == 0.5).int())
    else:
        scale = ratio
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    scaled = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(nb * BLOCK, kb * BLOCK)
    return scaled[:n, :k].to(FP8_DTYPE).contiguous(), scale
