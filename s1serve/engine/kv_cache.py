"""The paged KV cache: per layer a (keys, values) pair of [kv_heads, num_blocks, block_size, head_dim] tensors.

kv_heads is the number of KV heads this rank attends with (`model.num_local_kv_heads`: all of them on one rank,
a share or a single replicated head under tensor parallelism); the functions below default to the config's count.

Its size comes from `--num-kv-blocks`, or from `--cache-max-entry-count` as a fraction of the memory the device
has free once the weights are loaded. On CPU the cache is zero memory the OS maps on first write, so an engine only
holds the pages of blocks it has used; huge pages where the platform allows (host_memory.lazy_zeros), as attention
reads the cache as it reads the weights.
"""

from __future__ import annotations

import torch

from s1serve.config import TextConfig
from s1serve.engine.host_memory import lazy_zeros
from s1serve.layers.attention import KVCache


def kv_bytes_per_block(cfg: TextConfig, block_size: int, dtype: torch.dtype, kv_heads: int | None = None) -> int:
    """Bytes one block takes over all layers (keys and values) on a rank holding `kv_heads` KV heads."""
    per_token = 2 * (kv_heads or cfg.num_key_value_heads) * cfg.head_dim * dtype.itemsize
    return cfg.num_hidden_layers * block_size * per_token


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def num_blocks_for_memory(
    cfg: TextConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    fraction: float,
    kv_heads: int | None = None,
) -> int:
    return int(free_memory_bytes(device) * fraction) // kv_bytes_per_block(cfg, block_size, dtype, kv_heads)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return lazy_zeros(shape, dtype)


def allocate_kv_cache(
    cfg: TextConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    kv_heads: int | None = None,
) -> list[KVCache]:
    shape = (kv_heads or cfg.num_key_value_heads, num_blocks, block_size, cfg.head_dim)
    device = torch.device(device)
    return [(_zeros(shape, dtype, device), _zeros(shape, dtype, device)) for _ in range(cfg.num_hidden_layers)]
