"""Tensor-parallel linear layers and the vocabulary-parallel embedding and lm_head.

Each layer stores only this rank's part of a [out_features, in_features] weight (or [vocab, hidden] table) and
says which part that is (`full_shape`, `split_dim`, `part`), so that the loader reads just that slice of the
checkpoint tensor. With `ParallelContext.single()` every part is the whole tensor, every collective a no-op, and
each layer computes exactly what `nn.Linear` / `nn.Embedding` would.

- ColumnParallelLinear: output features [part) of the weight; no communication (the next layer consumes the
  split activations).
- RowParallelLinear: input features [part); the partial products are summed with one all-reduce over tp.
- VocabParallelEmbedding: vocabulary rows [part); ids outside the part give zero rows, then one all-reduce.
- ParallelLMHead: vocabulary rows [part); `compute_logits` all-gathers the shards into full float32 logits.

The vocabulary must divide evenly over tp (the published 155008 = 2^7 x 1211 does for every power of two up to
128); otherwise building raises a ValueError naming the sizes rather than padding the shards.

Weight formats: a linear holds its weight in the model's dtype, or, for modules an FP8 checkpoint quantised
(`WeightFormats` reads that from the config's quantization_config), as an `Fp8Weight`: float8_e4m3fn values plus
their 128x128 block scales (s1serve/checkpoint/fp8.py), multiplied by the FP8 kernels. A tp part of an FP8 weight
must start and end on a 128-block boundary (or the tensor's end), so that it owns whole scale blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from s1serve.checkpoint import fp8
from s1serve.checkpoint.loader import Target
from s1serve.config import QuantConfig
from s1serve.errors import ConfigError
from s1serve.layers import kernels
from s1serve.parallel.context import ParallelContext, all_gather, all_reduce


class ShardedWeight(nn.Module):
    """Holds `weight`: the part [part.start, part.stop) along `split_dim` of a tensor of `full_shape`."""

    def __init__(self, full_shape: tuple[int, int], split_dim: int, part: range, tp_size: int = 1):
        super().__init__()
        self.tp_size = tp_size
        self.full_shape = full_shape
        self.split_dim = split_dim
        self.part = part
        shape = list(full_shape)
        shape[split_dim] = len(part)
        self.allocate(tuple(shape))

    def allocate(self, shape: tuple[int, int]) -> None:
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return kernels.linear(x, self.weight, out_dtype)

    def checkpoint_targets(self, weight_name: str) -> dict[str, Target]:
        """The checkpoint tensors this module reads (`weight_name`: its weight's name there) and their slices."""
        return {weight_name: Target.part(self.weight, self.full_shape, self.split_dim, self.part)}


def fp8_block_part(part: range, size: int, tensor: str, dim: int, tp_size: int) -> range:
    """The scale blocks along one dimension that a part [start, stop) of a dimension of `size` owns; refuses a part
    that cuts through a 128-block."""
    if part.start % fp8.BLOCK or (part.stop % fp8.BLOCK and part.stop != size):
        raise ConfigError(
            f"tensor '{tensor}': tp={tp_size} splits dim {dim} ({size}) into parts of {len(part)}, which cut through "
            f"its {fp8.BLOCK}x{fp8.BLOCK} FP8 blocks; add expert parallelism (--ep {tp_size}) so experts stay whole, "
            f"or use a tp size whose parts are multiples of {fp8.BLOCK}"
        )
    return range(part.start // fp8.BLOCK, fp8.blocks(part.stop))


class Fp8Weight(ShardedWeight):
    """A ShardedWeight stored as FP8: `weight` float8_e4m3fn and `weight_scale_inv` [1, row blocks, column blocks]
    (one segment, the checkpoint's own layout), multiplied by the FP8 kernels. Mixed in before a linear class."""

    packable_fp8_weights = (("weight", "weight_scale_inv"),)

    def allocate(self, shape: tuple[int, int]) -> None:
        self.weight = nn.Parameter(torch.empty(shape, dtype=fp8.FP8_DTYPE), requires_grad=False)
        scale = torch.empty(1, *fp8.scale_shape(shape), dtype=torch.float32)
        self.weight_scale_inv = nn.Parameter(scale, requires_grad=False)

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return kernels.fp8_linear(x, self.weight, self.weight_scale_inv, out_dtype)

    def checkpoint_targets(self, weight_name: str) -> dict[str, Target]:
        targets = super().checkpoint_targets(weight_name)
        scale_full = fp8.scale_shape(self.full_shape)
        dim = self.split_dim
        blocks = fp8_block_part(self.part, self.full_shape[dim], weight_name, dim, self.tp_size)
        targets[fp8.scale_name(weight_name)] = Target.part(self.weight_scale_inv[0], scale_full, dim, blocks)
        return targets


def _tp_part(size: int, ctx: ParallelContext, what: str) -> range:
    part = ctx.tp_slice(size, what)
    return range(part.start, part.stop)


class ColumnParallelLinear(ShardedWeight):
    """y[:, part] = x W[part]^T (no bias). `rows` overrides the even tp split (e.g. replicated KV heads)."""

    packable_weights = ("weight",)

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, rows: range | None = None):
        part = rows if rows is not None else _tp_part(out_features, ctx, "output features")
        super().__init__((out_features, in_features), 0, part, ctx.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class RowParallelLinear(ShardedWeight):
    """y = sum over tp of x[:, part] W[:, part]^T (no bias): x arrives split, y leaves whole."""

    packable_weights = ("weight",)

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, cols: range | None = None):
        part = cols if cols is not None else _tp_part(in_features, ctx, "input features")
        super().__init__((out_features, in_features), 1, part, ctx.tp_size)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.matmul(x), self.ctx.tp_size, self.ctx.tp_group)


class Fp8ColumnParallelLinear(Fp8Weight, ColumnParallelLinear):
    """ColumnParallelLinear over an FP8 weight."""


class Fp8RowParallelLinear(Fp8Weight, RowParallelLinear):
    """RowParallelLinear over an FP8 weight."""


@dataclass(frozen=True)
class WeightFormats:
    """Which checkpoint modules hold FP8 weights: with a quantization_config, every linear module except those in
    its modules_to_not_convert (a listed name covers the modules under it)."""

    quantization: QuantConfig | None

    def is_fp8(self, module: str) -> bool:
        if self.quantization is None:
            return False
        parts = module.split(".")
        return not any(".".join(parts[:n]) in self._skipped for n in range(1, len(parts) + 1))

    @functools.cached_property
    def _skipped(self) -> frozenset[str]:
        return frozenset(self.quantization.modules_to_not_convert) if self.quantization else frozenset()

    def column(self, module: str, in_features: int, out_features: int, ctx: ParallelContext,
               rows: range | None = None) -> ColumnParallelLinear:
        cls = Fp8ColumnParallelLinear if self.is_fp8(module) else ColumnParallelLinear
        return cls(in_features, out_features, ctx, rows)

    def row(self, module: str, in_features: int, out_features: int, ctx: ParallelContext,
            cols: range | None = None) -> RowParallelLinear:
        cls = Fp8RowParallelLinear if self.is_fp8(module) else RowParallelLinear
        return cls(in_features, out_features, ctx, cols)


class VocabParallelEmbedding(ShardedWeight):
    """Embedding rows [part) of the vocabulary; the rank owning an id contributes its row, the others zeros."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext):
        super().__init__((vocab_size, hidden_size), 0, _tp_part(vocab_size, ctx, "vocabulary"))
        self.ctx = ctx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.part.start) | (ids >= self.part.stop)
        rows = F.embedding((ids - self.part.start).masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside[:, None], 0.0)
        return all_reduce(rows, self.ctx.tp_size, self.ctx.tp_group)


class ParallelLMHead(ShardedWeight):
    """Untied lm_head with vocabulary rows [part); every rank receives the full logits."""

    packable_weights = ("weight",)

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext):
        super().__init__((vocab_size, hidden_size), 0, _tp_part(vocab_size, ctx, "vocabulary"))
        self.ctx = ctx

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] -> float32 logits [T, vocab], identical on every rank."""
        logits = kernels.linear(hidden, self.weight, torch.float32)
        return all_gather(logits, self.ctx.tp_size, self.ctx.tp_group, dim=-1)
