"""Mixture-of-experts: grouped top-k router and SwiGLU experts computed once per expert per step.

Tokens are sorted by the expert they were routed to; each expert's rows then form one contiguous segment, and
the whole layer is two grouped matmuls (gate+up fused, then down) over those segments.

Parallel shapes (the router is replicated everywhere; every rank routes its own tokens):
- tp > 1, ep == 1: every expert's intermediate dimension is split over tp (w13's gate rows and up rows each
  sliced, w2's columns sliced); the partial sums meet in one all-reduce over tp.
- ep > 1, tokens replicated (dp == 1): rank r holds experts ctx.experts_of_rank(E) whole, computes only the
  (token, expert) rows routed to them, and the partial sums meet in one all-reduce over ep (with tp > 1 as well
  the tp and ep groups are the same ranks, and attention alone is split over tp).
- ep > 1, DP attention (dp == ep): each rank brings its own tokens, maybe none. The ranks exchange their token
  counts once per forward (exchange_token_counts); in every MoE layer each rank pads its tokens to the largest
  count and all-gathers them with their routing (ids and weights packed into the same byte rows: one
  collective), computes its experts' weighted part for every gathered row, and a reduce-scatter hands each rank
  the sums for its own rows. A rank without tokens still joins (InternS1ProForCausalLM.idle_step).
  benchmarks/ep_dispatch.py compares this with an all_to_all dispatch that sends each (token, expert) pair only
  to the expert's rank; results are in its docstring.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from s1serve.checkpoint import fp8
from s1serve.checkpoint.loader import Target
from s1serve.config import TextConfig
from s1serve.layers import kernels
from s1serve.layers.linear import WeightFormats, fp8_block_part
from s1serve.parallel.context import ParallelContext, all_gather, all_reduce, reduce_scatter

PROJECTIONS = ("gate", "up", "down")
SWIGLU_FUSED_MIN_ROWS = 16  # rows an expert on average from which gate/up and the product take one call


def select_experts(
    router_logits: torch.Tensor, top_k: int, num_groups: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (expert ids [T, k], weights [T, k] float32).

    Softmax over all experts in float32; with groups, exactly k/G experts are taken inside each of the G equal
    groups; the selected probabilities are renormalised to sum to one.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    tokens, num_experts = probs.shape
    if num_groups > 1:
        group_size = num_experts // num_groups
        local = torch.topk(probs.view(tokens, num_groups, group_size), top_k // num_groups, dim=-1).indices
        offsets = torch.arange(num_groups, device=probs.device).view(1, -1, 1) * group_size
        ids = (local + offsets).reshape(tokens, top_k)
        weights = probs.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    else:
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


class SparseMoE(nn.Module):
    """Router `gate` (replicated) plus this rank's experts stacked as w13 [E_local, 2I, H] (gate rows then up rows)
    and w2 [E_local, H, I]; `experts` are their global ids and `intermediate_part` the slice of each expert's
    intermediate dimension held here (all of it under EP)."""

    packable_weights = ("gate.weight", "w13", "w2")
    tensor_suffixes = ("weight",)  # of each expert projection's checkpoint tensors

    def __init__(self, cfg: TextConfig, ctx: ParallelContext):
        super().__init__()
        if ctx.tp_size > 1 and not ctx.tokens_replicated:
            raise ValueError("DP attention (tokens not replicated) does not combine with tp > 1")
        self.ctx = ctx
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.num_groups = cfg.router_n_groups
        self.renormalize = cfg.norm_topk_prob
        self.experts = ctx.experts_of_rank(cfg.num_experts)
        if ctx.ep_size == 1:
            part = ctx.tp_slice(cfg.moe_intermediate_size, "moe_intermediate_size")
            self.intermediate_part = range(part.start, part.stop)
        else:
            self.intermediate_part = range(cfg.moe_intermediate_size)
        self.intermediate = len(self.intermediate_part)
        self.hidden_size = cfg.hidden_size
        self.moe_intermediate_size = cfg.moe_intermediate_size
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.allocate(len(self.experts), cfg.hidden_size)

    def allocate(self, local: int, hidden: int) -> None:
        self.w13 = nn.Parameter(torch.empty(local, 2 * self.intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local, hidden, self.intermediate), requires_grad=False)

    def grouped(self, x: torch.Tensor, weight: str, ends: torch.Tensor) -> torch.Tensor:
        """x's row segments times the local experts' `weight` ("w13" or "w2")."""
        return kernels.grouped_linear(x, getattr(self, weight), ends)

    def swiglu(self, fused: ModuleType, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """bf16(silu(gate)) * up of the rows' experts, [R, intermediate], bitwise the same either way: in one call
        where w13 is packed for the bf16 kernel with whole 64-column blocks of gate and of up and the experts have
        prefill-sized row counts (it saves writing and reading back the [R, 2 x intermediate] products; a 2048-token
        step was faster in 5 of 5 measured pairs, docs/engine.md), else the gate/up matmul and then the product
        (decode steps: the one call was not measured apart from the noise there)."""
        if (kernels.is_packed(self.w13) and self.intermediate % kernels.BLOCK_N == 0
                and rows.shape[0] >= SWIGLU_FUSED_MIN_ROWS * len(self.experts)):
            return fused.grouped_swiglu(rows, self.w13, ends)
        return fused.silu_mul(self.grouped(rows, "w13", ends))

    def checkpoint_targets(self, prefix: str) -> dict[str, Target]:
        """The per-expert checkpoint tensors of the experts held here (`prefix`: the layer's `...mlp.`), each into
        its rows of w13 (gate rows, then up rows) or w2, sliced to the intermediate part held here."""
        inter, part = self.intermediate, self.intermediate_part
        up = (self.moe_intermediate_size, self.hidden_size)  # gate_proj and up_proj; down_proj transposed
        targets: dict[str, Target] = {}
        for local, j in enumerate(self.experts):
            ep = f"{prefix}experts.{j}."
            targets[ep + "gate_proj.weight"] = Target.part(self.w13[local, :inter], up, 0, part)
            targets[ep + "up_proj.weight"] = Target.part(self.w13[local, inter:], up, 0, part)
            targets[ep + "down_proj.weight"] = Target.part(self.w2[local], up[::-1], 1, part)
        return targets

    def checkpoint_names_elsewhere(self, prefix: str) -> set[str]:
        """The checkpoint tensors of the experts other EP ranks hold."""
        return {
            f"{prefix}experts.{j}.{proj}_proj.{suffix}"
            for j in range(self.num_experts)
            if j not in self.experts
            for proj in PROJECTIONS
            for suffix in self.tensor_suffixes
        }

    def forward(self, x: torch.Tensor, token_counts: list[int] | None = None) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]. `token_counts`: every ep rank's T this step under DP attention (as
        exchange_token_counts returns it; exchanged here when not given)."""
        ctx = self.ctx
        exchanged = ctx.ep_size > 1 and not ctx.tokens_replicated
        fused = kernels.fused_ops(x)
        if fused is not None and not exchanged and self._block_applies():  # the router and _local_experts at once
            swiglu_min_rows = SWIGLU_FUSED_MIN_ROWS if self.intermediate % kernels.BLOCK_N == 0 else 0
            out = fused.moe_block(x, self.gate.weight, self.w13, self.w2, self.top_k, self.num_groups,
                                  self.renormalize, self.experts.start, swiglu_min_rows)
            return self._summed_over_ranks(out)
        logits = kernels.linear(x, self.gate.weight)
        route = fused.select_experts if fused is not None else select_experts
        ids, weights = route(logits, self.top_k, self.num_groups, self.renormalize)
        if exchanged:
            counts = token_counts or exchange_token_counts(x.shape[0], ctx, x.device)
            return self._exchange(x, ids, weights, counts)
        return self._summed_over_ranks(self._local_experts(x, ids, weights))

    def _summed_over_ranks(self, out: torch.Tensor) -> torch.Tensor:
        """The held experts' sums, added over the ranks that hold the others (or the other parts of them)."""
        ctx = self.ctx
        if ctx.ep_size > 1:  # with tp > 1 too, the ep group is the tp group: one all-reduce
            return all_reduce(out, ctx.ep_size, ctx.ep_group)
        return all_reduce(out, ctx.tp_size, ctx.tp_group)

    def _block_applies(self) -> bool:
        """Whether moe_block takes the router and the held experts: a bf16 router, both expert stacks packed for the
        bf16 kernel (FP8 experts, Fp8SparseMoE, are not)."""
        return self.gate.weight.dtype == torch.bfloat16 and all(
            w.dtype == torch.bfloat16 and kernels.is_packed(w) for w in (self.w13, self.w2))

    def _local_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum over the routed experts held here of weight * expert(x), per row of x; ids [T, k] are global
        (ids owned elsewhere, or out of range as padding rows carry, contribute nothing)."""
        fused = kernels.fused_ops(x)
        if fused is not None:  # the same steps as below, each in one call
            token_of_row, row_weight, ends = fused.sort_rows(ids, weights, self.experts.start, len(self.experts))
            hidden = self.swiglu(fused, x.index_select(0, token_of_row), ends)
            return fused.combine(self.grouped(hidden, "w2", ends), token_of_row, row_weight, x.shape[0])
        flat_ids = ids.flatten()
        local = len(self.experts)
        if local == self.num_experts:
            key = flat_ids
        else:  # local experts first (as 0..local-1), everything else in one trailing bin that is never computed
            key = flat_ids - self.experts.start
            key = key.masked_fill((key < 0) | (key >= local), local)
        order = torch.argsort(key, stable=True)
        ends = torch.cumsum(torch.bincount(key, minlength=self.num_experts)[:local], 0)
        if local < self.num_experts:
            order = order[: int(ends[-1])]
        token_of_row = order // self.top_k
        hidden = self.grouped(x[token_of_row], "w13", ends)
        hidden = F.silu(hidden[:, : self.intermediate]) * hidden[:, self.intermediate :]
        out_rows = self.grouped(hidden, "w2", ends)
        out_rows = out_rows * weights.flatten()[order].to(x.dtype)[:, None]
        return torch.zeros_like(x).index_add_(0, token_of_row, out_rows)

    def _exchange(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """DP attention: every rank's tokens (padded to the largest count, with their routing) are gathered, each
        rank computes its experts' part for all of them, and a reduce-scatter returns each rank its rows' sums."""
        size, group = self.ctx.ep_size, self.ctx.ep_group
        padded = max(counts)
        if padded == 0:
            return x
        pad = (0, 0, 0, padded - x.shape[0])
        rows = _pack_rows(F.pad(x, pad), F.pad(ids.int(), pad, value=self.num_experts), F.pad(weights, pad))
        layout = [(x.dtype, x.shape[1]), (torch.int32, self.top_k), (weights.dtype, self.top_k)]
        x_all, ids_all, weights_all = _unpack_rows(all_gather(rows, size, group), layout)
        partial = self._local_experts(x_all, ids_all, weights_all)
        return reduce_scatter(partial, size, group)[: x.shape[0]]


class Fp8SparseMoE(SparseMoE):
    """SparseMoE with FP8 experts: w13 / w2 in float8_e4m3fn with segmented block scales (s1serve/checkpoint/fp8.py):
    w13_scale_inv [E_local, 2, row blocks, column blocks] (gate blocks, then up blocks), w2_scale_inv
    [E_local, 1, ., .]. Under tp each expert's intermediate part must own whole 128-blocks."""

    packable_fp8_weights = (("w13", "w13_scale_inv"), ("w2", "w2_scale_inv"))
    tensor_suffixes = ("weight", fp8.scale_name("weight"))

    def allocate(self, local: int, hidden: int) -> None:
        inter = self.intermediate
        self.w13 = nn.Parameter(torch.empty(local, 2 * inter, hidden, dtype=fp8.FP8_DTYPE), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local, hidden, inter, dtype=fp8.FP8_DTYPE), requires_grad=False)
        self.w13_scale_inv = nn.Parameter(
            torch.empty(local, 2, *fp8.scale_shape((inter, hidden)), dtype=torch.float32), requires_grad=False
        )
        self.w2_scale_inv = nn.Parameter(
            torch.empty(local, 1, *fp8.scale_shape((hidden, inter)), dtype=torch.float32), requires_grad=False
        )

    def grouped(self, x: torch.Tensor, weight: str, ends: torch.Tensor) -> torch.Tensor:
        return kernels.fp8_grouped_linear(x, getattr(self, weight), getattr(self, f"{weight}_scale_inv"), ends)

    def checkpoint_targets(self, prefix: str) -> dict[str, Target]:
        targets = super().checkpoint_targets(prefix)
        full = self.moe_intermediate_size
        tp_size = full // self.intermediate
        up_blocks = fp8.scale_shape((full, self.hidden_size))
        for local, j in enumerate(self.experts):
            ep = f"{prefix}experts.{j}."
            blocks = fp8_block_part(self.intermediate_part, full, ep + "gate_proj.weight", 0, tp_size)
            for segment, proj in enumerate(("gate", "up")):
                dest = self.w13_scale_inv[local, segment]
                targets[fp8.scale_name(f"{ep}{proj}_proj.weight")] = Target.part(dest, up_blocks, 0, blocks)
            dest = self.w2_scale_inv[local, 0]
            targets[fp8.scale_name(f"{ep}down_proj.weight")] = Target.part(dest, up_blocks[::-1], 1, blocks)
        return targets


def exchange_token_counts(num_tokens: int, ctx: ParallelContext, device: torch.device) -> list[int] | None:
    """Every ep rank's token count this step under DP attention with EP (one small all-gather, done once per
    forward and shared by all MoE layers); None when the ranks' tokens are replicated or experts not split."""
    if ctx.tokens_replicated or ctx.ep_size == 1:
        return None
    counts = all_gather(torch.tensor([num_tokens], device=device), ctx.ep_size, ctx.ep_group)
    return counts.tolist()


def _pack_rows(*parts: torch.Tensor) -> torch.Tensor:
    """Row-wise byte concatenation of 2-D tensors of any dtypes (so one collective moves them all)."""
    return torch.cat([p.contiguous().view(torch.uint8) for p in parts], dim=1)


def _unpack_rows(rows: torch.Tensor, layout: list[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of _pack_rows: `layout` lists each part's (dtype, columns)."""
    parts, start = [], 0
    for dtype, columns in layout:
        width = columns * dtype.itemsize
        parts.append(rows[:, start : start + width].contiguous().view(dtype))
        start += width
    return parts


class DenseMLP(nn.Module):
    """SwiGLU MLP for layers listed in mlp_only_layers; the intermediate dimension is split over tp."""

    def __init__(self, hidden: int, intermediate: int, ctx: ParallelContext, formats: WeightFormats, prefix: str):
        super().__init__()
        self.gate_proj = formats.column(f"{prefix}gate_proj", hidden, intermediate, ctx)
        self.up_proj = formats.column(f"{prefix}up_proj", hidden, intermediate, ctx)
        self.down_proj = formats.row(f"{prefix}down_proj", intermediate, hidden, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
