"""Scheduler: FCFS admission under a token budget and a sequence cap, chunked prefill, decode of every running
sequence in the same step, preemption of the newest sequence when blocks run out."""

from __future__ import annotations

import torch

from s1serve.engine.block_manager import BlockManager
from s1serve.engine.config import EngineConfig
from s1serve.engine.request import Request, Sequence, SequenceStatus
from s1serve.engine.scheduler import Scheduler
from s1serve.engine.text_output import TextOutput
from s1serve.sampling_params import SamplingParams


def make(num_blocks: int = 100, block_size: int = 16, **config) -> Scheduler:
    cfg = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **config)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, enable_caching=False))


def add(sched: Scheduler, length: int, n: int = 1) -> Sequence:
    tokens = list(range(1000 + len(sched.waiting) * 1000, 1000 + len(sched.waiting) * 1000 + length))
    request = Request("r", tokens, SamplingParams(n=n), seed=0, max_len=10_000, stop_ids=frozenset())
    seq = Sequence(request, 0, list(tokens), torch.Generator(), TextOutput(None, ()), pending_forks=n - 1)
    sched.add(seq)
    return seq


def step(sched: Scheduler) -> dict[int, int]:
    """Schedules, then plays the engine: computes the scheduled tokens, samples where a sequence is complete."""
    out = sched.schedule()
    for seq, n in out.scheduled:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
    return {id(seq): n for seq, n in out.scheduled}


def test_token_budget_chunks_long_prompts_and_admits_in_order():
    sched = make(max_num_batched_tokens=128)
    a, b, c = add(sched, 100), add(sched, 100), add(sched, 100)
    assert step(sched) == {id(a): 100, id(b): 28}
    # a decodes, b's prefill continues, c gets the rest of the budget.
    assert step(sched) == {id(a): 1, id(b): 72, id(c): 55}
    assert step(sched) == {id(a): 1, id(b): 1, id(c): 45}
    assert step(sched) == {id(a): 1, id(b): 1, id(c): 1}
    assert a.num_tokens == 104 and b.num_tokens == 103 and c.num_tokens == 102


def test_sequence_cap_counts_the_samples_a_request_will_fork():
    sched = make(max_num_seqs=4)
    a = add(sched, 10, n=3)
    b, c = add(sched, 10), add(sched, 10)
    assert set(step(sched)) == {id(a), id(b)}  # a holds 3 slots, b the fourth, c waits
    assert list(sched.waiting) == [c]


def test_fcfs_does_not_skip_a_head_that_does_not_fit():
    sched = make(num_blocks=10, max_num_batched_tokens=1000)
    a = add(sched, 100)  # 7 blocks
    b = add(sched, 100)  # does not fit next to a
    c = add(sched, 10)  # would fit, but comes after b
    assert set(step(sched)) == {id(a)}
    assert list(sched.waiting) == [b, c]


def test_preemption_frees_the_newest_sequence_and_requeues_it_first():
    sched = make(num_blocks=4, block_size=4, max_num_batched_tokens=1000)
    a, b = add(sched, 8), add(sched, 8)  # 2 blocks each; all 4 taken
    step(sched)
    assert sched.blocks.num_free_blocks == 0 and a.num_tokens == 9 and b.num_tokens == 9
    # a's 9th token needs a third block: b, the newest, is preempted and waits at the head of the queue.
    scheduled = step(sched)
    assert scheduled == {id(a): 1}
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert list(sched.waiting) == [b] and sched.num_preemptions == 1
    assert b.token_ids[-1] == 7  # its sampled token stays: it is recomputed, not resampled


def test_a_sequence_alone_that_outgrows_the_cache_is_infeasible():
    sched = make(num_blocks=2, block_size=4)
    a = add(sched, 8)
    step(sched)  # prompt computed, 9th token sampled: it needs a third block
    out = sched.schedule()
    assert out.infeasible == [a] and out.scheduled == [] and a.status is SequenceStatus.FINISHED
    assert sched.blocks.num_free_blocks == 2



def prefill_beside_a_decode(sched: Scheduler, prompt_len: int, decode_until: int) -> list[tuple[int, int]]:
    """(context, chunk) of each step of a long prompt's prefill, with a short sequence decoding beside it until
    the prompt reaches `decode_until` computed tokens (then the short one ends)."""
    short = add(sched, 10)
    step(sched)  # its prompt computed: it decodes from now on
    long = add(sched, prompt_len)
    chunks = []
    while long.num_computed_tokens < prompt_len:
        if short.status is SequenceStatus.RUNNING and long.num_computed_tokens >= decode_until:
            sched.remove(short)
        context, decoding = long.num_computed_tokens, short.status is SequenceStatus.RUNNING
        scheduled = step(sched)
        assert scheduled.get(id(short)) == (1 if decoding else None)  # the decode runs in every step
        chunks.append((context, scheduled[id(long)]))
    return chunks


def test_a_lone_long_prompt_prefills_at_the_full_budget():
    sched = make(num_blocks=5000, max_num_batched_tokens=2048)
    long = add(sched, 60000)
    while long.num_computed_tokens < 29 * 2048:  # up to 59k tokens of context, each chunk is the whole budget
        assert step(sched) == {id(long): 2048}


def test_prompt_chunks_beside_a_decode_stay_within_the_token_and_pair_bounds():
    sched = make(num_blocks=5000, max_num_batched_tokens=2048)  # defaults: 256 tokens, 2**18 pairs
    chunks = prefill_beside_a_decode(sched, 60000, decode_until=60000)
    assert chunks[0] == (0, 256)  # the token bound
    assert all(n * (context + n) <= 1 << 18 for context, n in chunks)
    assert {n for context, n in chunks[:-1] if context >= 50000} == {5, 4}  # 4-5 tokens over a 50-60k context
    assert len(chunks) > 5000


def test_prompt_chunks_take_the_full_budget_again_once_no_one_decodes():
    sched = make(num_blocks=5000, max_num_batched_tokens=2048)
    chunks = prefill_beside_a_decode(sched, 60000, decode_until=40000)
    late = [n for context, n in chunks if context >= 40000]
    assert late[0] == 2048 and set(late[:-1]) == {2048}


def test_without_bounds_a_chunk_beside_a_decode_takes_the_rest_of_the_budget():
    sched = make(num_blocks=5000, max_num_batched_tokens=2048, max_prefill_tokens_while_decoding=0,
                 max_prefill_pairs_while_decoding=0)
    chunks = prefill_beside_a_decode(sched, 60000, decode_until=60000)
    assert {n for _, n in chunks[:-1]} == {2047}


def test_a_request_arriving_during_a_lone_long_prefill_is_admitted_at_the_next_step():
    sched = make(num_blocks=5000, max_num_batched_tokens=2048)
    long = add(sched, 60000)
    for _ in range(3):
        assert step(sched) == {id(long): 2048}
    short = add(sched, 10)
    assert step(sched) == {id(long): 2038, id(short): 10}  # the long chunk leaves room for the newcomer's prompt
    assert step(sched)[id(short)] == 1  # and it decodes from now on
