"""Block manager: ref counts, the chained prefix cache, LRU eviction, and the free-count invariant."""

from __future__ import annotations

import torch

from s1serve.engine.block_manager import BlockManager
from s1serve.engine.request import Request, Sequence
from s1serve.engine.text_output import TextOutput
from s1serve.sampling_params import SamplingParams

BS = 4


def seq(tokens: list[int]) -> Sequence:
    request = Request("r", list(tokens), SamplingParams(), seed=0, max_len=1000, stop_ids=frozenset())
    return Sequence(request, 0, list(tokens), torch.Generator(), TextOutput(None, ()))


def run(bm: BlockManager, s: Sequence) -> list[int]:
    """Admits s with its cached prefix, computes all its tokens, registers its full blocks; returns the hits."""
    cached = bm.cached_prefix(s)
    assert bm.can_admit(cached, s.num_tokens - len(cached) * BS)
    bm.admit(s, cached)
    bm.grow(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)
    return cached


def test_allocation_and_free_return_every_block():
    bm = BlockManager(10, BS, enable_caching=False)
    a, b = seq(list(range(9))), seq(list(range(100, 105)))
    run(bm, a)
    run(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 5
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 10 and a.block_table == [] and a.num_computed_tokens == 0


def test_prefix_hits_need_the_whole_chain_and_leave_the_last_token():
    bm = BlockManager(20, BS, enable_caching=True)
    a = seq(list(range(12)))  # 3 full blocks
    run(bm, a)
    same = seq(list(range(12)))
    hits = run(bm, same)
    assert hits == a.block_table[:2]  # the third would cover the last token, which must be computed
    assert same.num_computed_tokens == 12 and same.block_table[:2] == a.block_table[:2]
    longer = seq(list(range(12)) + [99])
    assert bm.cached_prefix(longer) == a.block_table[:3]
    # Same second block content after a different first block: no hit (keys chain over the prefix).
    other = seq([7, 7, 7, 7] + list(range(4, 12)) + [1])
    assert bm.cached_prefix(other) == []


def test_shared_blocks_are_ref_counted():
    bm = BlockManager(10, BS, enable_caching=True)
    a = seq(list(range(9)))
    run(bm, a)
    b = seq(list(range(9)))
    run(bm, b)
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.num_free_blocks == 10 - 3 - 1
    bm.free(a)
    assert bm.num_free_blocks == 10 - 3  # the shared blocks still belong to b
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_unreferenced_cached_blocks_are_revived_then_evicted_least_recent_first():
    bm = BlockManager(4, BS, enable_caching=True)
    a, b = seq(list(range(5))), seq(list(range(50, 55)))
    run(bm, a)
    run(bm, b)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 4
    revived = seq(list(range(5)))
    assert len(run(bm, revived)) == 1  # a's full block, still cached while unreferenced
    bm.free(revived)
    # Three fresh blocks: the two never-cached ones go first, then the least recently freed cached block (b's).
    filler = seq(list(range(200, 212)))
    run(bm, filler)
    assert bm.cached_prefix(seq(list(range(50, 55)))) == []
    assert len(bm.cached_prefix(seq(list(range(5))))) == 1


def test_fork_shares_full_blocks_and_recomputes_the_tail():
    bm = BlockManager(10, BS, enable_caching=False)
    parent = seq(list(range(10)))
    run(bm, parent)
    child = seq(list(range(10)))
    bm.share_prefix(parent, child)
    assert child.block_table == parent.block_table[:2] and child.num_computed_tokens == 8
    bm.free(parent)
    assert bm.num_free_blocks == 8
    bm.free(child)
    assert bm.num_free_blocks == 10


def test_reset_prefix_cache_forgets_unreferenced_blocks():
    bm = BlockManager(6, BS, enable_caching=True)
    a = seq(list(range(9)))
    run(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.cached_prefix(seq(list(range(9)))) == [] and bm.num_free_blocks == 6
