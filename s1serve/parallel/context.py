"""ParallelContext: what one rank's layers need to know about the ranks they share work with.

Layers receive it when built (no globals beyond the process groups). Sizes of 1 mean "not split": the collective
helpers below are then no-ops, so the single-process model runs the same code with `ParallelContext.single()`.

- tp: attention heads, dense MLPs, the embedding and lm_head (vocabulary) and, without EP, each expert's
  intermediate dimension are split over the `tp` group; partial results meet in one all-reduce.
- ep: experts are partitioned over the `ep` group (rank r owns a contiguous range).
- tokens_replicated: every rank of the ep group holds the same tokens (tp and/or replicated attention, dp == 1);
  then a MoE layer needs only an all-reduce of its partial sums. False under DP attention (dp > 1): each rank
  brings its own tokens, which the MoE layer exchanges with the ep group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor collectives (the old names warn); older releases in our range have only the old.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None  # a torch.distributed ProcessGroup when tp_size > 1
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Any = None  # a torch.distributed ProcessGroup when ep_size > 1
    tokens_replicated: bool = True

    def __post_init__(self) -> None:
        for name in ("tp", "ep"):
            rank, size = getattr(self, f"{name}_rank"), getattr(self, f"{name}_size")
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{name}_rank must be in 0..{size - 1} for {name}_size {size}, got {rank}")

    @classmethod
    def single(cls) -> "ParallelContext":
        return cls()

    def experts_of_rank(self, num_experts: int) -> range:
        """The global ids of the experts this rank owns (all of them without EP)."""
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts cannot be split evenly over ep={self.ep_size} ranks")
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def tp_slice(self, size: int, what: str) -> slice:
        """This rank's contiguous part of a dimension of `size` split over the tp group."""
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) cannot be split evenly over tp={self.tp_size} ranks")
        part = size // self.tp_size
        return slice(self.tp_rank * part, (self.tp_rank + 1) * part)


def all_reduce(x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
    """Sum over the group, in place; a no-op for a group of one."""
    if size > 1:
        dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, size: int, group: Any, dim: int = 0) -> torch.Tensor:
    """Concatenation along `dim` of every rank's equally shaped `x`, in rank order."""
    if size == 1:
        return x
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    if dim == 0:
        return out
    return torch.cat(out.chunk(size, dim=0), dim=dim)


def reduce_scatter(x: torch.Tensor, size: int, group: Any) -> torch.Tensor:
    """This rank's chunk (of `size` equal chunks along dim 0) of the sum of every rank's `x`."""
    if size == 1:
        return x
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out
