"""Mixture-of-experts: grouped top-k router and SwiGLU experts computed once per expert per step.

Tokens are sorted by the expert they were routed to; each expert's rows then form one contiguous segment, and
the whole layer is two grouped matmuls (gate+up fused, then down) over those segments.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from s1serve.config import TextConfig


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


def grouped_matmul(x: torch.Tensor, weight_t: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Row segment e of x (rows ends[e-1]..ends[e]) times weight_t[e]; weight_t is [E, in, out].

    torch._grouped_mm needs 16-byte aligned rows; odd shapes fall back to one matmul per non-empty expert.
    """
    align = 16 // x.element_size()
    if x.shape[-1] % align == 0 and weight_t.shape[-1] % align == 0 and x.dtype in (torch.float32, torch.bfloat16):
        return torch._grouped_mm(x, weight_t, offs=ends.to(torch.int32))
    out = x.new_empty(x.shape[0], weight_t.shape[-1])
    start = 0
    for expert, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight_t[expert]
        start = end
    return out


class SparseMoE(nn.Module):
    """Router `gate` plus experts stacked as w13 [E, 2I, H] (gate rows then up rows) and w2 [E, H, I]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.num_groups = cfg.router_n_groups
        self.renormalize = cfg.norm_topk_prob
        self.intermediate = cfg.moe_intermediate_size
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(cfg.num_experts, 2 * self.intermediate, cfg.hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, self.intermediate), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = select_experts(self.gate(x), self.top_k, self.num_groups, self.renormalize)
        flat_ids = ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        token_of_row = order // self.top_k
        ends = torch.cumsum(torch.bincount(flat_ids, minlength=self.num_experts), 0)
        hidden = grouped_matmul(x[token_of_row], self.w13.transpose(1, 2), ends)
        hidden = F.silu(hidden[:, : self.intermediate]) * hidden[:, self.intermediate :]
        out_rows = grouped_matmul(hidden, self.w2.transpose(1, 2), ends)
        out_rows = out_rows * weights.flatten()[order].to(x.dtype)[:, None]
        return torch.zeros_like(x).index_add_(0, token_of_row, out_rows)


class DenseMLP(nn.Module):
    """SwiGLU MLP for layers listed in mlp_only_layers."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
