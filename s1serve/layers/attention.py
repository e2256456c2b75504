"""Attention over a paged KV cache for a flat batch of tokens from many sequences.

The cache of one layer is a pair of tensors [kv_heads, num_blocks, block_size, head_dim] (heads outermost, so
that a gather by block table yields contiguous per-head key matrices; under tensor parallelism only the KV heads
this rank attends with); a sequence owns the blocks listed in its row of the block table. One step may mix
prefill chunks and decode tokens: every sequence contributes `query_len` new tokens that sit after `context_len`
cached ones.

Two paths, chosen by each token's position alone, so that a token's result never depends on how its sequence was
scheduled (prefill chunk, decode, draft verification, recompute after preemption):
- below KERNEL_CONTEXT, on a CPU with the kernels: the per-row kernel of fused_ops.cpp, which reads each row's keys
  in place through its block table;
- otherwise: each sequence's keys are gathered by block table into a grouped matmul -> float32 softmax -> matmul
  (query heads grouped under their KV head), which measured far faster than SDPA for one-token queries in bf16.
  Sequences are padded within groups of similar shape; decode and prefill rows go through the same code (the bf16
  CPU matmuls are row-invariant).
Each path is row-invariant on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from s1serve.config import TextConfig
from s1serve.layers import kernels
from s1serve.layers.linear import WeightFormats
from s1serve.layers.norm import RMSNorm
from s1serve.layers.rotary import apply_rotary
from s1serve.parallel.context import ParallelContext, all_reduce

KVCache = tuple[torch.Tensor, torch.Tensor]

# Most bytes of float32 scores [KV heads, seqs, query heads per KV head, rows, keys] held at once: a group whose
# scores would be larger attends its query rows in slices (a 2048-token chunk over a 60k context would otherwise
# hold ~2 GB). Kept under glibc's largest mmap threshold (32 MiB), so that a slice's buffers come back from the
# heap instead of being mapped and page-faulted in anew for every slice.
SCORE_BYTES = 16 << 20

# Tokens at positions below this attend through the CPU kernel (`fused_ops.cpp`, paged_attention) where it applies:
# per row, keys read in place, no padding or mask. It is the faster path for decodes and short prompts, but a
# prefill row costs ~55 instructions per (row, key, KV head) where the batched matmuls amortise theirs over rows:
# on the bench preset a 4096-token prompt took 7.3 s with the bound at 8192, 4.4 s at 1024 and 4.6 s with no
# kernel; a 2048-token one 2.4 s at 2048, 1.6 s at 1024, 1.7 s without.
KERNEL_CONTEXT = 1024


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences attended together, padded to the group's longest query and context."""

    token_index: torch.Tensor  # [t] rows of the flat batch that belong to this group
    block_tables: torch.Tensor  # [b, max_blocks] block ids per sequence (padding entries point at block 0)
    padded_row: torch.Tensor  # [t] row of each token among the padded queries: its sequence x max_q + its index
    query_pos: torch.Tensor  # [b, max_q] position of each (padded) query row
    seq_lens: torch.Tensor  # [b] tokens of each sequence, cached and new
    allowed: torch.Tensor | None  # [b, max_q, max_blocks * block_size] causal mask; None past SCORE_BYTES / 4
    max_query_len: int

    def mask(self, start: int, stop: int, key_len: int) -> torch.Tensor:
        """[b, stop - start, key_len]: which keys the query rows start:stop may see."""
        if self.allowed is not None:
            return self.allowed[:, start:stop]
        key_pos = torch.arange(key_len, device=self.seq_lens.device)[None, None, :]
        return (key_pos <= self.query_pos[:, start:stop, None]) & (key_pos < self.seq_lens[:, None, None])


@dataclass(frozen=True)
class KernelRows:
    """The tokens that attend through the CPU kernel (positions below KERNEL_CONTEXT) and where their keys are."""

    rows: torch.Tensor  # [t] rows of the flat batch
    tables: torch.Tensor  # the step's block tables, flattened
    table_start: torch.Tensor  # [t] where each row's sequence's table starts in `tables`
    positions: torch.Tensor  # [t] each row's position: it sees keys 0..position


def kernel_context(cache_dtype: torch.dtype, device: torch.device | str, head_dim: int) -> int:
    """KERNEL_CONTEXT where the CPU attention kernel takes this cache (bf16 on the CPU, the kernels built, head_dim a
    multiple of 32 up to 256), else 0: every token then takes the batched matmuls."""
    if torch.device(device).type != "cpu" or cache_dtype != torch.bfloat16 or head_dim % 32 or head_dim > 256:
        return 0
    return KERNEL_CONTEXT if kernels.bf16_kernels() is not None else 0


@dataclass(frozen=True)
class AttentionBatch:
    """Where each token of a flat batch belongs. Built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each new token
    positions: torch.Tensor  # [T] position of each new token in its sequence
    groups: tuple[AttentionGroup, ...]  # the tokens that take the batched matmuls
    kernel: KernelRows | None = None  # the tokens that take the CPU kernel

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        kernel_below: int = 0,
    ) -> "AttentionBatch":
        """`kernel_below`: tokens at positions below it take the CPU kernel (kernel_context's answer; 0: none do).
        The path depends on the token's position only, so a token's result never depends on how it was scheduled."""
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        starts = torch.cumsum(q_lens, 0) - q_lens
        token_seq = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        token_row = torch.arange(len(token_seq)) - starts[token_seq]
        positions = torch.tensor(context_lens, dtype=torch.long)[token_seq] + token_row
        table_ids = torch.tensor([b for row in block_tables for b in row], dtype=torch.long)
        table_starts = torch.tensor([0] + [len(row) for row in block_tables[:-1]], dtype=torch.long).cumsum(0)
        slots = table_ids[table_starts[token_seq] + positions // block_size] * block_size + positions % block_size
        in_kernel = [min(q, max(0, kernel_below - c)) for q, c in zip(query_lens, context_lens)]
        kernel = None
        if any(in_kernel):
            rows = torch.cat([torch.arange(start, start + n) for start, n in zip(starts.tolist(), in_kernel)])
            kernel = KernelRows(rows=rows.to(device), tables=table_ids.to(device),
                                table_start=table_starts[token_seq[rows]].to(device),
                                positions=positions[rows].to(device))
        # the rest of each sequence's tokens, after its kernel rows, take the batched matmuls
        rest = [i for i, (q, n) in enumerate(zip(query_lens, in_kernel)) if q > n]
        rest_q = [query_lens[i] - in_kernel[i] for i in rest]
        rest_context = [context_lens[i] + in_kernel[i] for i in rest]
        rest_start = [int(starts[i]) + in_kernel[i] for i in rest]
        rest_tables = [block_tables[i] for i in rest]
        groups = tuple(
            _build_group(members, rest_q, rest_context, rest_tables, block_size, rest_start, device)
            for members in _partition(rest_q, rest_context)
        )
        return cls(slot_mapping=slots.to(device), positions=positions.to(device), groups=groups, kernel=kernel)


def _partition(query_lens: list[int], context_lens: list[int]) -> list[list[int]]:
    """Splits sequences into groups whose padded attention work stays within twice the real work.

    Padding a group to its longest query and context costs (members x max_q x max_s); sorting by that shape
    keeps e.g. one long prefill chunk from padding every decode token of the step to its length.
    """
    shape = lambda i: (query_lens[i], context_lens[i] + query_lens[i])  # noqa: E731
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(query_lens)), key=shape):
        q, s = shape(i)
        if groups and (len(groups[-1]) + 1) * q * s > 2 * (real + q * s):
            groups.append([])
            real = 0
        if not groups:
            groups.append([])
        groups[-1].append(i)
        real += q * s
    return [sorted(g) for g in groups]  # batch order inside a group: one group needs no reordering


def _build_group(
    members: list[int],
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    starts: list[int],
    device: torch.device | str,
) -> AttentionGroup:
    q_lens = torch.tensor([query_lens[i] for i in members], dtype=torch.long)
    ctx = torch.tensor([context_lens[i] for i in members], dtype=torch.long)
    seq_lens = ctx + q_lens
    width = max(len(block_tables[i]) for i in members)
    table = torch.zeros(len(members), width, dtype=torch.long)
    for row, i in enumerate(members):
        table[row, : len(block_tables[i])] = torch.tensor(block_tables[i], dtype=torch.long)
    token_seq = torch.repeat_interleave(torch.arange(len(members)), q_lens)
    local_starts = torch.cumsum(q_lens, 0) - q_lens
    token_row = torch.arange(len(token_seq)) - local_starts[token_seq]
    token_index = torch.tensor([starts[i] for i in members], dtype=torch.long)[token_seq] + token_row
    max_q = int(q_lens.max())
    query_pos = ctx[:, None] + torch.arange(max_q)[None, :]  # [b, Q]
    allowed = None
    if len(members) * max_q * width * block_size * 4 <= SCORE_BYTES:  # always so where the scores fit one slice
        key_pos = torch.arange(width * block_size)[None, None, :]
        allowed = ((key_pos <= query_pos[:, :, None]) & (key_pos < seq_lens[:, None, None])).to(device)
    return AttentionGroup(
        token_index=token_index.to(device),
        block_tables=table.to(device),
        padded_row=(token_seq * max_q + token_row).to(device),
        query_pos=query_pos.to(device),
        seq_lens=seq_lens.to(device),
        allowed=allowed,
        max_query_len=max_q,
    )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]. Writes k, v into the cache, attends causally, returns [T, H, D]."""
    k_cache, v_cache = cache
    kv_heads, _, _, head_dim = k_cache.shape
    k_cache.view(kv_heads, -1, head_dim).index_copy_(1, batch.slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.view(kv_heads, -1, head_dim).index_copy_(1, batch.slot_mapping, v.transpose(0, 1).to(v_cache.dtype))
    return attend_cached(q, cache, batch, scale)


def attend_cached(q: torch.Tensor, cache: KVCache, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q: [T, H, D] over the cache, which already holds this step's keys and values; returns [T, H, D]."""
    k_cache, v_cache = cache
    kernel = batch.kernel
    if kernel is not None:
        attend = kernels.bf16_kernels().paged_attention
        if kernel.rows.numel() == q.shape[0]:  # every token of the step
            return attend(q.contiguous(), k_cache, v_cache, kernel.tables, kernel.table_start, kernel.positions, scale)
    elif len(batch.groups) == 1:
        return _attend_group(q, cache, batch.groups[0], scale)
    out = torch.empty_like(q)
    if kernel is not None:
        rows = attend(q.index_select(0, kernel.rows).contiguous(), k_cache, v_cache, kernel.tables,
                      kernel.table_start, kernel.positions, scale)
        out.index_copy_(0, kernel.rows, rows)
    for group in batch.groups:
        out[group.token_index] = _attend_group(q[group.token_index], cache, group, scale)
    return out


def _attend_group(q: torch.Tensor, cache: KVCache, group: AttentionGroup, scale: float) -> torch.Tensor:
    """Attention of one group's tokens q [t, H, D] (in group order) over their sequences' cached keys.

    Keys are gathered whole blocks at a time into [KVH, B, S, D] with S = blocks x block_size (contiguous, so
    the matmul needs no copy; masking covers the tail). Query rows go through in slices whose scores stay within
    SCORE_BYTES; each row's result is the same in any slice (row-invariant kernels, a softmax per row).
    """
    k_cache, v_cache = cache
    kv_heads, _, block_size, head_dim = k_cache.shape
    num_seqs, width = group.block_tables.shape
    heads = q.shape[1]
    group_size, q_len, s_len = heads // kv_heads, group.max_query_len, width * block_size
    blocks = group.block_tables.flatten()
    keys = k_cache.index_select(1, blocks).view(kv_heads, num_seqs, s_len, head_dim).to(q.dtype)
    values = v_cache.index_select(1, blocks).view(kv_heads, num_seqs, s_len, head_dim).to(q.dtype)

    if q_len == 1:
        out = _attend_rows(q.view(num_seqs, 1, kv_heads, group_size, head_dim), keys, values, group.mask(0, 1, s_len),
                           scale)
        return out.view(num_seqs, heads, head_dim)
    # one flat row index each way: two-tensor advanced indexing cost ~0.7 ms per layer for 1024 tokens
    padded = q.new_zeros(num_seqs * q_len, heads, head_dim).index_copy_(0, group.padded_row, q)
    padded = padded.view(num_seqs, q_len, kv_heads, group_size, head_dim)
    rows = max(1, SCORE_BYTES // (kv_heads * num_seqs * group_size * s_len * 4))
    if rows >= q_len:
        out = _attend_rows(padded, keys, values, group.mask(0, q_len, s_len), scale)
    else:
        out = torch.empty_like(padded).view(num_seqs, q_len, heads, head_dim)
        for start in range(0, q_len, rows):
            stop = min(start + rows, q_len)
            out[:, start:stop] = _attend_rows(padded[:, start:stop], keys, values, group.mask(start, stop, s_len),
                                              scale)
    return out.reshape(num_seqs * q_len, heads, head_dim).index_select(0, group.padded_row)


def _attend_rows(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """queries [B, r, KVH, group, D] over keys/values [KVH, B, S, D] under allowed [B, r, S]: [B, r, H, D].

    The query heads that share a KV head become extra rows of one matmul: scores [KVH, B, group*r, S].
    """
    num_seqs, q_len, kv_heads, group_size, head_dim = queries.shape
    s_len = keys.shape[2]
    grouped = queries.permute(2, 0, 3, 1, 4).reshape(kv_heads, num_seqs, group_size * q_len, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)) * scale
    scores = scores.view(kv_heads, num_seqs, group_size, q_len, s_len).float()
    scores = scores.masked_fill(~allowed[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(queries.dtype).view(kv_heads, num_seqs, group_size * q_len, s_len)
    out = torch.matmul(probs, values)  # [KVH, B, group*r, D]
    out = out.view(kv_heads, num_seqs, group_size, q_len, head_dim).permute(1, 3, 0, 2, 4)
    return out.reshape(num_seqs, q_len, kv_heads * group_size, head_dim)


def kv_head_range(cfg: TextConfig, ctx: ParallelContext) -> range:
    """The KV heads this rank keeps: its share when tp <= num_kv_heads, else the one its query heads use."""
    kv_heads, size = cfg.num_key_value_heads, ctx.tp_size
    if kv_heads % size and size % kv_heads:
        raise ValueError(f"tp={size} must divide num_key_value_heads ({kv_heads}) or be a multiple of it")
    if size <= kv_heads:
        per_rank = kv_heads // size
        return range(ctx.tp_rank * per_rank, (ctx.tp_rank + 1) * per_rank)
    head = ctx.tp_rank // (size // kv_heads)
    return range(head, head + 1)


class Attention(nn.Module):
    """GQA self-attention with per-head q/k RMSNorm before the position encoding (no biases).

    Under tp, rank r computes query heads [r*H/tp, (r+1)*H/tp) and the KV heads they read (kv_head_range), and
    o_proj sums the ranks' partial outputs. q_norm/k_norm act per head_dim and are replicated.
    """

    def __init__(self, cfg: TextConfig, ctx: ParallelContext, formats: WeightFormats, prefix: str):
        """`prefix`: the checkpoint name of this module plus a dot (which formats ask about)."""
        super().__init__()
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        q_heads = ctx.tp_slice(cfg.num_attention_heads, "num_attention_heads")
        kv_heads = kv_head_range(cfg, ctx)
        self.num_heads = q_heads.stop - q_heads.start
        self.num_kv_heads = len(kv_heads)
        d, hidden = self.head_dim, cfg.hidden_size
        q_rows = range(q_heads.start * d, q_heads.stop * d)
        kv_rows = range(kv_heads.start * d, kv_heads.stop * d)
        self.q_proj = formats.column(f"{prefix}q_proj", hidden, cfg.num_attention_heads * d, ctx, rows=q_rows)
        self.k_proj = formats.column(f"{prefix}k_proj", hidden, cfg.num_key_value_heads * d, ctx, rows=kv_rows)
        self.v_proj = formats.column(f"{prefix}v_proj", hidden, cfg.num_key_value_heads * d, ctx, rows=kv_rows)
        self.o_proj = formats.row(f"{prefix}o_proj", cfg.num_attention_heads * d, hidden, ctx, cols=q_rows)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, batch: AttentionBatch
    ) -> torch.Tensor:
        """x: [T, hidden]; cos/sin: [T, 1 or local KV heads, head_dim]; the cache holds the local KV heads."""
        tokens = x.shape[0]
        if self._fused_prologue_applies(x, cos, cache):
            weights = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
            if self._block_applies(batch, tokens):  # every step below, up to o_proj's all-reduce, in one call
                out = kernels.bf16_kernels().attention_block(
                    x, weights, self.o_proj.weight, self.num_heads, self.num_kv_heads, self.q_norm.weight,
                    self.q_norm.eps, self.k_norm.weight, self.k_norm.eps, cos, sin, *cache, batch.slot_mapping,
                    batch.kernel.tables, batch.kernel.table_start, batch.kernel.positions, self.scale)
                return all_reduce(out, self.o_proj.ctx.tp_size, self.o_proj.ctx.tp_group)
            # the same steps in two calls (projections, the rest)
            qkv = kernels.linears(x, weights)
            q = kernels.bf16_kernels().qk_norm_rotary_cache(
                qkv, self.num_heads, self.num_kv_heads, self.q_norm.weight, self.q_norm.eps, self.k_norm.weight,
                self.k_norm.eps, cos, sin, *cache, batch.slot_mapping)
            out = attend_cached(q, cache, batch, self.scale)
            return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))
        q = self.q_norm(self.q_proj(x).view(tokens, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, cache, batch, self.scale)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))

    def _block_applies(self, batch: AttentionBatch, tokens: int) -> bool:
        """Whether attention_block takes the whole forward (given the prologue applies): every token attends
        through the paged kernel, and o_proj's weight is packed bf16 (not FP8)."""
        kernel = batch.kernel
        o_weight = self.o_proj.weight
        return (kernel is not None and kernel.rows.numel() == tokens and o_weight.dtype == torch.bfloat16
                and kernels.is_packed(o_weight))

    def _fused_prologue_applies(self, x: torch.Tensor, cos: torch.Tensor, cache: KVCache) -> bool:
        """Whether the CPU kernels take the projections and the steps up to the cache write: bf16 everywhere, the
        three projections' weights packed for the bf16 kernel (not FP8)."""
        weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.q_norm.weight, self.k_norm.weight)
        return (
            kernels.fused_ops(x) is not None
            and x.dim() == 2
            and all(w.dtype == torch.bfloat16 for w in weights)
            and all(kernels.is_packed(w) for w in weights[:3])
            and cos.dtype == torch.bfloat16
            and all(c.dtype == torch.bfloat16 and c.device.type == "cpu" for c in cache)
        )
