"""The paged KV cache: per layer a (keys, values) pair of [num_blocks, block_size, kv_heads, head_dim] tensors."""

from __future__ import annotations

import torch

from s1serve.config import TextConfig
from s1serve.layers.attention import KVCache


def kv_bytes_per_block(cfg: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers (keys and values)."""
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
    return cfg.num_hidden_layers * block_size * per_token


def allocate_kv_cache(
    cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str
) -> list[KVCache]:
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.num_hidden_layers)
    ]
