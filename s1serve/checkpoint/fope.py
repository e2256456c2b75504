"""FoPE's kept frequencies and, from them, the shape of a checkpoint's `rotary_emb.{sin,cos}_coef` tensors.

Here, below the layers, because the checkpoint writers (tiny.py) need the shape as much as the rotary layer does.
The inverse frequencies are float32 always (see layers/rotary.py).
"""

from __future__ import annotations

import math

import torch

from s1serve.config import TextConfig


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/head_dim) for i in 0..head_dim/2-1, float32, decreasing."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    return 1.0 / (theta**exponents)


def fope_frequencies(cfg: TextConfig) -> torch.Tensor:
    """The F inverse frequencies FoPE keeps: the first num_inv_freq, else those with a period below max positions."""
    inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta)
    assert cfg.fope is not None
    if cfg.fope.num_inv_freq is not None:
        return inv_freq[: cfg.fope.num_inv_freq]
    return inv_freq[inv_freq > 2.0 * math.pi / cfg.max_position_embeddings]


def fope_coef_shape(cfg: TextConfig) -> tuple[int, ...]:
    """Shape of the checkpoint's `rotary_emb.{sin,cos}_coef` tensors."""
    kept = fope_frequencies(cfg).numel()
    return (cfg.num_key_value_heads, kept, kept) if cfg.fope.sep_head else (kept, kept)
