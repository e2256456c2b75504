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
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from s1serve.distributed.context import ParallelContext, all_gather, all_reduce
from s1serve.layers import kernels


class ShardedWeight(nn.Module):
    """Holds `weight`: the part [part.start, part.stop) along `split_dim` of a tensor of `full_shape`."""

    def __init__(self, full_shape: tuple[int, int], split_dim: int, part: range):
        super().__init__()
        self.full_shape = full_shape
        self.split_dim = split_dim
        self.part = part
        shape = list(full_shape)
        shape[split_dim] = len(part)
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)


def _tp_part(size: int, ctx: ParallelContext, what: str) -> range:
    part = ctx.tp_slice(size, what)
    return range(part.start, part.stop)


class ColumnParallelLinear(ShardedWeight):
    """y[:, part] = x W[part]^T (no bias). `rows` overrides the even tp split (e.g. replicated KV heads)."""

    packable_weights = ("weight",)

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, rows: range | None = None):
        part = rows if rows is not None else _tp_part(out_features, ctx, "output features")
        super().__init__((out_features, in_features), 0, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)


class RowParallelLinear(ShardedWeight):
    """y = sum over tp of x[:, part] W[:, part]^T (no bias): x arrives split, y leaves whole."""

    packable_weights = ("weight",)

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext, cols: range | None = None):
        part = cols if cols is not None else _tp_part(in_features, ctx, "input features")
        super().__init__((out_features, in_features), 1, part)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(kernels.linear(x, self.weight), self.ctx.tp_size, self.ctx.tp_group)


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
