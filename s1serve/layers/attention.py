"""Attention over a paged KV cache for a flat batch of tokens from many sequences.

The cache of one layer is a pair of tensors [num_blocks, block_size, kv_heads, head_dim]; a sequence owns the
blocks listed in its row of the block table. One step may mix prefill chunks and decode tokens: every sequence
contributes `query_len` new tokens that sit after `context_len` cached ones.

The CPU path gathers each sequence's keys by block table and runs a grouped matmul -> float32 softmax -> matmul
(query heads grouped under their KV head), which measured far faster than SDPA for one-token queries in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from s1serve.config import TextConfig
from s1serve.layers.norm import RMSNorm
from s1serve.layers.rotary import apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AttentionBatch:
    """Where each token of a flat batch belongs. Built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] block ids per sequence (padding entries point at block 0)
    context_lens: torch.Tensor  # [B] tokens already cached before this step
    seq_lens: torch.Tensor  # [B] context_lens + query lens
    token_seq: torch.Tensor  # [T] sequence index of each new token
    token_row: torch.Tensor  # [T] index of each new token inside its sequence's query
    max_query_len: int
    max_seq_len: int

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> "AttentionBatch":
        seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
        width = max(len(t) for t in block_tables)
        table = torch.zeros(len(block_tables), width, dtype=torch.long)
        for i, row in enumerate(block_tables):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        ctx = torch.tensor(context_lens, dtype=torch.long)
        token_seq = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        token_row = torch.arange(int(q_lens.sum())) - starts[token_seq]
        positions = ctx[token_seq] + token_row
        slots = table[token_seq, positions // block_size] * block_size + positions % block_size
        return cls(
            slot_mapping=slots.to(device),
            block_tables=table.to(device),
            context_lens=ctx.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device),
            token_seq=token_seq.to(device),
            token_row=token_row.to(device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]. Writes k, v into the cache, attends causally, returns [T, H, D]."""
    k_cache, v_cache = cache
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))

    num_seqs, heads = batch.block_tables.shape[0], q.shape[1]
    group = heads // kv_heads
    q_len, s_len = batch.max_query_len, batch.max_seq_len
    keys = k_cache[batch.block_tables].flatten(1, 2)[:, :s_len]  # [B, S, KVH, D]
    values = v_cache[batch.block_tables].flatten(1, 2)[:, :s_len]

    padded = q.new_zeros(num_seqs, q_len, heads, head_dim)
    padded[batch.token_seq, batch.token_row] = q
    # [B, KVH, group*Q, D]: the query heads that share a KV head become extra rows of one matmul.
    grouped = padded.view(num_seqs, q_len, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    grouped = grouped.reshape(num_seqs, kv_heads, group * q_len, head_dim)
    scores = torch.matmul(grouped, keys.permute(0, 2, 3, 1).to(q.dtype)) * scale  # [B, KVH, group*Q, S]
    scores = scores.view(num_seqs, kv_heads, group, q_len, s_len)

    query_pos = batch.context_lens[:, None] + torch.arange(q_len, device=q.device)[None, :]  # [B, Q]
    key_pos = torch.arange(s_len, device=q.device)
    allowed = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < batch.seq_lens[:, None, None])
    scores = scores.float().masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(num_seqs, kv_heads, group * q_len, s_len)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3).to(q.dtype))  # [B, KVH, group*Q, D]
    out = out.view(num_seqs, kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4).reshape(num_seqs, q_len, heads, head_dim)
    return out[batch.token_seq, batch.token_row]


class Attention(nn.Module):
    """GQA self-attention with per-head q/k RMSNorm before the position encoding (no biases)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, batch: AttentionBatch
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(tokens, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, cache, batch, self.scale)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))
