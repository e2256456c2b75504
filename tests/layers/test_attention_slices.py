"""Paged attention in query-row slices (a group whose scores would pass SCORE_BYTES): bitwise the same result as
in one piece, with GQA and several sequences of different query and context lengths; decodes are never sliced."""

from __future__ import annotations

import pytest
import torch

from s1serve.layers import attention
from s1serve.layers.attention import AttentionBatch, paged_attention

BLOCK_SIZE, KV_HEADS, HEADS, HEAD_DIM, NUM_BLOCKS = 16, 2, 8, 32, 64


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def run(query_lens: list[int], context_lens: list[int], score_bytes: int, monkeypatch: pytest.MonkeyPatch):
    """The attention output of one step, and how many row slices each group went through."""
    monkeypatch.setattr(attention, "SCORE_BYTES", score_bytes)
    tables, next_block = [], 0
    for q, c in zip(query_lens, context_lens):
        n = -(-(q + c) // BLOCK_SIZE)
        tables.append(list(range(next_block, next_block + n))[::-1])  # not in order: the gather must follow the table
        next_block += n
    cache = (bf16(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM, seed=1), bf16(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM, seed=2))
    tokens = sum(query_lens)
    q, k, v = bf16(tokens, HEADS, HEAD_DIM, seed=3), bf16(tokens, KV_HEADS, HEAD_DIM, seed=4), bf16(tokens, KV_HEADS, HEAD_DIM, seed=5)
    batch = AttentionBatch.build(query_lens, context_lens, tables, BLOCK_SIZE, "cpu")
    calls = []
    rows = attention._attend_rows
    monkeypatch.setattr(attention, "_attend_rows", lambda queries, *a: calls.append(queries.shape[1]) or rows(queries, *a))
    out = paged_attention(q, k, v, cache, batch, HEAD_DIM**-0.5)
    monkeypatch.setattr(attention, "_attend_rows", rows)
    return out, calls


@pytest.mark.parametrize(
    "query_lens, context_lens",
    [
        ([100], [0]),  # one prefill from the start
        ([37], [200]),  # a chunk after a cached context
        ([50, 20, 33], [10, 90, 0]),  # several sequences in one group, padded to 50 rows
        ([1, 1, 1, 60, 1], [40, 7, 300, 150, 0]),  # decodes beside a chunk: groups of their own
    ],
)
def test_slices_give_bitwise_the_unsliced_result(query_lens, context_lens, monkeypatch):
    whole, whole_calls = run(query_lens, context_lens, 1 << 40, monkeypatch)
    # 4 KB of scores: a few query rows per slice (one where a row over the keys alone is larger).
    sliced, sliced_calls = run(query_lens, context_lens, 4096, monkeypatch)
    assert len(sliced_calls) > len(whole_calls)  # slicing happened
    assert torch.equal(sliced, whole)
    assert torch.isfinite(whole.float()).all()


def test_decodes_run_in_one_piece_whatever_the_bound(monkeypatch):
    _, calls = run([1, 1, 1], [500, 3, 60], 1, monkeypatch)
    assert calls == [1] * len(calls)  # one call per group, one row each


def test_masks_past_the_bound_are_built_per_slice(monkeypatch):
    monkeypatch.setattr(attention, "SCORE_BYTES", 4096)
    group = AttentionBatch.build([40], [100], [list(range(9))], BLOCK_SIZE, "cpu").groups[0]
    assert group.allowed is None
    monkeypatch.setattr(attention, "SCORE_BYTES", 1 << 40)
    whole = AttentionBatch.build([40], [100], [list(range(9))], BLOCK_SIZE, "cpu").groups[0]
    assert torch.equal(group.mask(5, 17, 144), whole.allowed[:, 5:17])
