"""Batched greedy generation equals one-at-a-time generation token for token: plain, under preemption, and with
prefix caching."""

from __future__ import annotations

from engine_testing import GREEDY, make_llm


def test_prompt_set_covers_the_range(mixed_prompts):
    lengths = sorted(len(p) for p in mixed_prompts)
    assert len(mixed_prompts) == 32 and lengths[0] == 1 and lengths[-1] == 500


def test_batched_greedy_equals_one_at_a_time(tiny_checkpoint, mixed_prompts, one_at_a_time):
    llm = make_llm(tiny_checkpoint, enable_prefix_caching=False, max_num_batched_tokens=256)
    outs = llm.generate(prompt_token_ids=mixed_prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == one_at_a_time
    assert all(o.finish_reason == "length" and len(o.token_ids) == GREEDY.max_tokens for o in outs)
    assert llm.engine.num_preemptions == 0


def test_batched_greedy_with_preemption_equals_one_at_a_time(tiny_checkpoint, mixed_prompts, one_at_a_time):
    # 40 blocks of 16 tokens: the longest prompt (500 + 12 tokens) fits alone, a few of them together do not.
    llm = make_llm(tiny_checkpoint, enable_prefix_caching=False, num_kv_blocks=40, max_num_batched_tokens=512)
    outs = llm.generate(prompt_token_ids=mixed_prompts, sampling_params=GREEDY, use_tqdm=False)
    assert llm.engine.num_preemptions > 0
    assert [o.token_ids for o in outs] == one_at_a_time
    assert llm.engine.num_free_blocks == 40


def test_batched_greedy_with_prefix_caching_equals_one_at_a_time(tiny_checkpoint, mixed_prompts, one_at_a_time):
    llm = make_llm(tiny_checkpoint, enable_prefix_caching=True, max_num_batched_tokens=256)
    first = llm.generate(prompt_token_ids=mixed_prompts, sampling_params=GREEDY, use_tqdm=False)
    hits_first = llm.engine.num_prefix_hit_tokens
    again = llm.generate(prompt_token_ids=mixed_prompts[::-1], sampling_params=GREEDY, use_tqdm=False)[::-1]
    assert hits_first > 0  # the shared prefixes, within the first batch
    assert llm.engine.num_prefix_hit_tokens - hits_first >= sum((len(p) - 1) // 16 * 16 for p in mixed_prompts)
    assert [o.token_ids for o in first] == one_at_a_time
    assert [o.token_ids for o in again] == one_at_a_time
