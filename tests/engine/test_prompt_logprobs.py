"""Prompt logprobs against one full forward over the whole prompt (teacher forcing): log_softmax of the logits at
position i scores prompt token i + 1. The engine computes them inside its steps (chunked prefill, bounded row
slices, the prefix cache skipped); the reference is `prompt_logits`, a single prefill in a cache of its own."""

from __future__ import annotations

import pytest
import torch
from engine_testing import make_llm, random_prompts

from s1serve import SamplingParams
from s1serve.engine.prompt_logprobs import SLICE_ELEMENTS
from s1serve.layers.sampler import TokenLogprob

TOL = 1e-4
LONG = 300  # prompt tokens: more rows than one scoring slice (SLICE_ELEMENTS // vocab = 108)


def params(k: int, max_tokens: int = 2) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, prompt_logprobs=k)


def assert_full_forward(llm, prompt: list[int], entries: list[TokenLogprob | None] | None, k: int) -> None:
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    reference = torch.log_softmax(llm.prompt_logits(prompt).float(), dim=-1)
    for i in range(1, len(prompt)):
        entry, row = entries[i], reference[i - 1]
        assert entry.token_id == prompt[i], i
        assert abs(entry.logprob - float(row[prompt[i]])) <= TOL, i
        assert entry.rank == int((row >= row[prompt[i]]).sum()), i
        top = row.topk(k)
        assert [t for t, _ in entry.top] == top.indices.tolist(), i
        assert torch.allclose(torch.tensor([v for _, v in entry.top]), top.values, atol=TOL, rtol=0), i


def test_the_long_prompt_spans_several_scoring_slices(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    assert LONG - 1 > SLICE_ELEMENTS // llm.engine.vocab_size


@pytest.mark.parametrize("k", [0, 5])
@pytest.mark.parametrize("budget", [2048, 64], ids=["one-chunk", "chunked"])
def test_prompt_logprobs_equal_a_full_forward(tiny_checkpoint, budget, k):
    """A short and a long prompt in one batch: in one chunk each, or over many 64-token steps."""
    llm = make_llm(tiny_checkpoint, max_num_batched_tokens=budget)
    prompts = random_prompts(2, 40, 40, seed=21)[:1] + random_prompts(1, LONG, LONG, seed=22)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params(k), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert_full_forward(llm, prompt, out.prompt_logprobs, k)
        assert len(out.token_ids) == 2


def test_a_cached_prefix_is_recomputed_not_skipped(tiny_checkpoint):
    """The second request shares four cached blocks with the first: it must still score every position (a cached
    block has no logits) and takes nothing from the cache; a third without prompt logprobs takes those blocks."""
    llm = make_llm(tiny_checkpoint)
    prefix = random_prompts(1, 64, 64, seed=23)[0]
    first, second, third = (prefix + tail for tail in random_prompts(3, 20, 20, seed=24))
    outs = [llm.generate(prompt_token_ids=[p], sampling_params=params(3), use_tqdm=False)[0] for p in (first, second)]
    for prompt, out in zip((first, second), outs):
        assert_full_forward(llm, prompt, out.prompt_logprobs, 3)
    assert llm.engine.num_prefix_hit_tokens == 0

    llm.generate(prompt_token_ids=[third], sampling_params=SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.engine.num_prefix_hit_tokens == 64


def test_they_come_once_with_the_first_output(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, max_num_batched_tokens=16)
    prompt = random_prompts(1, 50, 50, seed=25)[0]
    llm.engine.add_request("r", prompt, params(2, max_tokens=4))
    deltas = []
    while llm.engine.has_unfinished_requests():
        deltas += llm.engine.step()
    assert [d.prompt_logprobs is not None for d in deltas] == [True, False, False, False]
    assert deltas[0].token_ids and len(deltas[0].prompt_logprobs) == len(prompt)


def test_a_one_token_prompt_has_only_the_leading_none(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    out = llm.generate(prompt_token_ids=[[5000]], sampling_params=params(4), use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]


def test_every_sample_keeps_the_one_list_and_requests_without_them_have_none(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    prompt = random_prompts(1, 30, 30, seed=26)[0]
    sampled = SamplingParams(n=3, max_tokens=3, seed=1, prompt_logprobs=1)
    outs = llm.generate(prompt_token_ids=[prompt, prompt], sampling_params=[sampled, SamplingParams(max_tokens=3)],
                        use_tqdm=False)
    assert len(outs[0].outputs) == 3
    assert_full_forward(llm, prompt, outs[0].prompt_logprobs, 1)
    assert outs[1].prompt_logprobs is None


def test_a_request_preempted_in_its_prefill_scores_each_position_once(tiny_checkpoint):
    """Ten blocks for two prompts: the second is preempted midway through its prompt and recomputed from the start."""
    llm = make_llm(tiny_checkpoint, num_kv_blocks=10, max_num_batched_tokens=48)
    prompts = random_prompts(1, 100, 100, seed=27) + random_prompts(1, 60, 60, seed=28)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params(2, max_tokens=20), use_tqdm=False)
    assert llm.engine.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert_full_forward(llm, prompt, out.prompt_logprobs, 2)
