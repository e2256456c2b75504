"""N-gram speculative decoding: the proposer, the verification rule, and the engine with it on against off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_testing import make_llm, random_prompts

from s1serve import SamplingParams
from s1serve.config import GenerationDefaults
from s1serve.engine.config import EngineConfig
from s1serve.engine.ngram_proposer import NgramProposer
from s1serve.layers.rejection_sampler import verify_drafts

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "fixtures/model/golden_tiny_seed0.json").read_text())
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
REPETITIVE = [[1000, 2000, 3000, 4000] * 10, [5000 + i % 7 for i in range(60)], [7000, 7001, 7002] * 5 + [9] * 20]


# ---------------------------------------------------------------------------------------------------- proposer


def test_proposer_takes_what_followed_the_most_recent_longest_match():
    proposer = NgramProposer(k=3, max_n=3, min_n=1)
    # The suffix [1, 2] occurs at 0..1 (followed by 7, 8, 9) and [2] alone more recently at 5 (followed by 6).
    assert proposer.propose([1, 2, 7, 8, 9, 2, 6, 1, 2], limit=10) == [7, 8, 9]
    # Of two equally long matches, the most recent wins.
    assert proposer.propose([1, 2, 5, 1, 2, 6, 1, 2], limit=10) == [6, 1, 2]


def test_proposer_without_a_match_or_below_min_n_proposes_nothing():
    assert NgramProposer(k=3, max_n=3, min_n=1).propose([1, 2, 3, 4], limit=10) == []
    assert NgramProposer(k=3, max_n=3, min_n=2).propose([5, 2, 9, 7, 2], limit=10) == []  # only [2] recurs
    assert NgramProposer(k=3, max_n=3, min_n=2).propose([5, 2, 9, 5, 2], limit=10) == [9, 5, 2]
    assert NgramProposer(k=3, max_n=3, min_n=1).propose([4], limit=10) == []


def test_proposer_caps_drafts_at_k_limit_and_the_end_of_the_sequence():
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert NgramProposer(k=2, max_n=2, min_n=1).propose(tokens, limit=10) == [3, 4]
    assert NgramProposer(k=5, max_n=2, min_n=1).propose(tokens, limit=1) == [3]
    assert NgramProposer(k=5, max_n=2, min_n=1).propose(tokens, limit=0) == []
    assert NgramProposer(k=5, max_n=2, min_n=1).propose([3, 1, 2, 1, 2], limit=10) == [1, 2]  # what follows runs out


def test_proposer_max_n_bounds_the_match():
    # [8, 1, 2] occurs at 0..2 (-> 5), [1, 2] more recently at 4..5 (-> 6): with max_n 2 the recent one wins.
    tokens = [8, 1, 2, 5, 1, 2, 6, 8, 1, 2]
    assert NgramProposer(k=1, max_n=3, min_n=1).propose(tokens, limit=10) == [5]
    assert NgramProposer(k=1, max_n=2, min_n=1).propose(tokens, limit=10) == [6]


def test_config_checks_the_speculation_flags():
    with pytest.raises(ValueError, match="--speculative-ngram-tokens"):
        EngineConfig(speculative_ngram_tokens=-1)
    with pytest.raises(ValueError, match="--prompt-lookup-min"):
        EngineConfig(prompt_lookup_min=5, prompt_lookup_max=3)


# ------------------------------------------------------------------------------------------------- verification


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5)])
def test_verification_is_exact_in_distribution(params):
    """First token ~ p(row 0) whatever the draft; given the first draft accepted, the second ~ p(row 1)."""
    params = params.with_defaults(GenerationDefaults())
    vocab, draws = 8, 6000
    logits = torch.tensor([[2.0, 0.5, 1.5, -1.0, 0.0, 1.0, -3.0, 0.3]] * 3) + torch.arange(3.0)[:, None] * 0.1
    drafts = [0, 5]  # the first row's likeliest token (rejected about half the time), then a less likely one
    values = logits / params.temperature
    if params.top_k > 0:
        values = values.masked_fill(values < values.topk(params.top_k, -1).values[:, -1:], float("-inf"))
    p = torch.softmax(values, -1)
    generator = torch.Generator().manual_seed(1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(draws):
        tokens = verify_drafts(logits, [drafts], [params], [generator])[0]
        first[tokens[0]] += 1
        if tokens[0] == drafts[0]:
            second[tokens[1]] += 1
    # chi-square with at most 7 degrees of freedom: P(stat > 24.32) = 0.001 under the null.
    assert _chi_square(first, p[0]) < 24.32
    assert _chi_square(second, p[1]) < 24.32
    assert second.sum() > draws / 4  # the second row was actually exercised


def test_greedy_verification_accepts_while_the_argmax_agrees():
    logits = torch.full((4, 10), -5.0)
    logits[0, 3] = logits[1, 4] = logits[2, 9] = logits[3, 1] = 5.0
    greedy = SamplingParams(temperature=0).with_defaults(GenerationDefaults())
    generator = torch.Generator()
    assert verify_drafts(logits, [[3, 4, 7]], [greedy], [generator]) == [[3, 4, 9]]
    assert verify_drafts(logits, [[3, 4, 9]], [greedy], [generator]) == [[3, 4, 9, 1]]  # all accepted: the bonus
    assert verify_drafts(logits, [[0, 4, 9]], [greedy], [generator]) == [[3]]


# ------------------------------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    return make_llm(tiny_checkpoint)


@pytest.fixture(scope="module")
def speculating(tiny_checkpoint):
    return make_llm(tiny_checkpoint, speculative_ngram_tokens=4, prompt_lookup_min=1)


def _ids(llm, prompts, params=GREEDY) -> list[list[int]]:
    return [list(o.token_ids) for o in llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]


@pytest.fixture(scope="module")
def echoing(plain) -> list[int]:
    """A prompt whose greedy continuation repeats its own last tokens: the tiny model's output on REPETITIVE[0]
    falls into a two-token cycle after 20 tokens; the prompt ends inside it, so drafts are accepted at once."""
    out = _ids(plain, REPETITIVE[:1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert out[22:24] == out[20:22], f"the tiny model no longer cycles on REPETITIVE[0]: {out}"
    return REPETITIVE[0] + out


def test_greedy_is_identical_with_and_without_speculation(plain, speculating, echoing):
    """The golden prompts, 100 random ones and the repetitive ones in one batch (sequences with and without
    drafts share steps); drafts must have been accepted on the echoing one."""
    golden = [p["prompt_ids"] for p in GOLDEN["prompts"]]
    prompts = [echoing] + golden + random_prompts(100, 1, 40, seed=99) + REPETITIVE
    before = speculating.engine.stats()
    assert _ids(speculating, prompts) == _ids(plain, prompts)
    after = speculating.engine.stats()
    assert after.spec_accepted_tokens >= before.spec_accepted_tokens + 4
    assert after.spec_draft_tokens >= after.spec_accepted_tokens


def test_one_step_verifies_drafts_beside_plain_decodes(speculating, plain, echoing):
    """Stepping the engine by hand: a step where one sequence emits several tokens and another one."""
    engine = speculating.engine
    prompts = [echoing] + random_prompts(3, 5, 20, seed=5)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"step-{i}", prompt, params)
    outputs: dict[str, list[int]] = {f"step-{i}": [] for i in range(len(prompts))}
    mixed = False
    while engine.has_unfinished_requests():
        deltas = engine.step()
        sizes = {len(d.token_ids) for d in deltas if d.token_ids}
        mixed |= 1 in sizes and max(sizes, default=0) > 1
        for d in deltas:
            outputs[d.request_id] += d.token_ids
    assert mixed
    assert [outputs[f"step-{i}"] for i in range(len(prompts))] == _ids(plain, prompts, params)


def test_stops_inside_accepted_drafts(plain, speculating, echoing):
    """max_tokens caps the drafts; a stop id among accepted drafts ends the sample there (the rest dropped)."""
    long = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reference = _ids(plain, [echoing], long)[0]
    caps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in range(1, 17)]
    assert _ids(speculating, [echoing] * 16, caps) == [reference[:m] for m in range(1, 17)]
    stops = sorted(set(reference))
    by_stop = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[t]) for t in stops]
    outs = speculating.generate(prompt_token_ids=[echoing] * len(stops), sampling_params=by_stop, use_tqdm=False)
    for t, out in zip(stops, outs):
        assert list(out.token_ids) == reference[: reference.index(t) + 1]
        assert out.finish_reason == "stop"


def test_prefix_cache_holds_only_accepted_tokens(plain, speculating, echoing):
    """Blocks cached from a speculating run's output serve a later prompt that extends into that output."""
    prompts = [echoing] + REPETITIVE
    outs = _ids(speculating, prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    extended = [prompt + out[:36] for prompt, out in zip(prompts, outs)]
    hits = speculating.engine.stats().prefix_hit_tokens
    assert _ids(speculating, extended) == _ids(plain, extended)
    assert speculating.engine.stats().prefix_hit_tokens > hits


def test_seeded_sampling_with_speculation_is_reproducible(speculating, echoing):
    params = [
        SamplingParams(temperature=0.3, max_tokens=24, ignore_eos=True, seed=11),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=24, ignore_eos=True, seed=12),
    ]
    prompts = [echoing, REPETITIVE[1]]
    assert _ids(speculating, prompts, params) == _ids(speculating, prompts, params)


def test_metrics_export_the_speculation_counts():
    from s1serve.engine.engine import EngineStats
    from s1serve.serve.openai.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    metrics.observe_engine(EngineStats(0, 0, 10, 10, 0, 0, 0, spec_draft_tokens=12, spec_accepted_tokens=5))
    text = metrics.render().decode()
    assert "s1serve_spec_decode_num_draft_tokens 12.0" in text
    assert "s1serve_spec_decode_num_accepted_tokens 5.0" in text
