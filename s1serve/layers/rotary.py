"""Rotary position encodings: plain RoPE and FoPE (Fourier position encoding) of Intern-S1-Pro.

Both produce per-position (cos, sin) tables of width head_dim that are applied rotate-half style. FoPE mixes the
kept frequencies through learned [F, F] matrices per KV head and pads the unkept ones with 1.0 (not 0). The
inverse frequencies are computed and held in float32 always: a bf16-rounded inv_freq changes logits visibly at
long positions.
"""

from __future__ import annotations

import torch
from torch import nn

from s1serve.checkpoint.fope import fope_coef_shape, fope_frequencies, inverse_frequencies
from s1serve.config import TextConfig
from s1serve.layers import kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Frequencies(nn.Module):
    """Holds float32 inverse frequencies outside the parameter/buffer machinery, so that building the model on
    the meta device and casting it to bf16 can never touch them."""

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self._inv_freq = inv_freq

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        return positions.to(torch.float32)[:, None] * self._inv_freq[None, :]


class RotaryEmbedding(_Frequencies):
    """Plain RoPE: cos/sin of shape [T, 1, head_dim], shared by every head."""

    def __init__(self, cfg: TextConfig):
        super().__init__(inverse_frequencies(cfg.head_dim, cfg.rope_theta))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.angles(positions)
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]
        return emb.cos(), emb.sin()


class FourierEmbedding(_Frequencies):
    """FoPE: cos/sin of shape [T, len(kv_heads) or 1, head_dim] in float32.

    With sep_head the coefficients follow their KV head: a rank keeps the rows of the KV heads it attends with
    (`kv_heads`, a range of the checkpoint's heads); without it the one [F, F] pair is replicated.
    """

    def __init__(self, cfg: TextConfig, kv_heads: range):
        super().__init__(fope_frequencies(cfg))
        self.head_dim = cfg.head_dim
        self.sep_head = cfg.fope.sep_head
        self.kv_heads = kv_heads
        shape = fope_coef_shape(cfg)
        if self.sep_head:
            shape = (len(kv_heads), *shape[1:])
        self.sin_coef = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
        self.cos_coef = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = self.angles(positions)  # [T, F]
        if self.sep_head:
            sin = torch.einsum("tf,hfg->thg", angles.sin(), self.sin_coef.float())
            cos = torch.einsum("tf,hfg->thg", angles.cos(), self.cos_coef.float())
        else:
            sin = (angles.sin() @ self.sin_coef.float())[:, None, :]
            cos = (angles.cos() @ self.cos_coef.float())[:, None, :]
        pad = self.head_dim // 2 - sin.shape[-1]
        sin = nn.functional.pad(sin, (0, pad), value=1.0)
        cos = nn.functional.pad(cos, (0, pad), value=1.0)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def build_position_encoding(cfg: TextConfig, kv_heads: range) -> nn.Module:
    """RoPE, or FoPE keeping the coefficients of `kv_heads` (the KV heads this rank attends with)."""
    return RotaryEmbedding(cfg) if cfg.fope is None else FourierEmbedding(cfg, kv_heads)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, groups, head_dim] with heads a multiple of groups.

    Head j uses group j // (heads / groups): the GQA grouping, so query heads follow their KV head.
    """
    heads, groups = x.shape[1], cos.shape[1]
    fused = kernels.fused_ops(x)
    if fused is not None and cos.dtype == sin.dtype == torch.bfloat16 and x.stride(-1) == 1 and heads % groups == 0:
        return fused.rotary(x, cos, sin)  # the same roundings in one call
    if groups not in (1, heads):
        cos = cos.repeat_interleave(heads // groups, dim=1)
        sin = sin.repeat_interleave(heads // groups, dim=1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
