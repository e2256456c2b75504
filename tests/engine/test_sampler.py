"""The batched sampler: each filter's mask against a direct computation, penalties, distribution, logprobs and
row independence."""

from __future__ import annotations

import torch

from s1serve.layers.sampler import Sampler, apply_logit_bias, apply_penalties, greedy_tokens, keep_mask
import pytest

from s1serve.sampling_params import InvalidParameterError, SamplingParams

V = 1000


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    # Distinct values spread widely: no ties, no filter boundary within rounding of a threshold.
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(V, generator=gen).float() / 60.0 for _ in range(rows)])


def params(**kw) -> SamplingParams:
    base = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)
    return SamplingParams(**{**base, **kw})


def direct_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    return x >= torch.sort(x, descending=True).values[k - 1] if 0 < k < len(x) else torch.ones_like(x, dtype=torch.bool)


def direct_top_p(x: torch.Tensor, p: float) -> torch.Tensor:
    probs = torch.softmax(x.double(), -1)
    order = torch.argsort(probs, descending=True)
    mass_before = torch.cumsum(probs[order], 0) - probs[order]
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[order] = mass_before < p
    return keep


def direct_min_p(x: torch.Tensor, m: float) -> torch.Tensor:
    probs = torch.softmax(x.double(), -1)
    return probs >= m * probs.max()


def test_top_k_mask_matches_direct_computation():
    x = logits(4)
    ps = [params(top_k=k) for k in (1, 7, 50, 0)]
    got = keep_mask(x, ps)
    for row, p in enumerate(ps):
        assert torch.equal(got[row], direct_top_k(x[row], p.top_k)), p.top_k
    assert got.sum(1).tolist() == [1, 7, 50, V]


def test_top_p_mask_matches_direct_computation_at_each_temperature():
    x = logits(6, seed=1)
    settings = [(0.1, 1.0), (0.5, 1.0), (0.9, 1.0), (0.95, 0.5), (0.95, 2.0), (1.0, 1.0)]
    ps = [params(top_p=p, temperature=t) for p, t in settings]
    got = keep_mask(x, ps)
    for row, p in enumerate(ps):
        assert torch.equal(got[row], direct_top_p(x[row] / p.temperature, p.top_p)), (p.top_p, p.temperature)
    assert got[0].sum() >= 1 and got[-1].all()


def test_min_p_mask_matches_direct_computation():
    x = logits(3, seed=2)
    ps = [params(min_p=m) for m in (0.0, 0.01, 0.3)]
    got = keep_mask(x, ps)
    for row, p in enumerate(ps):
        assert torch.equal(got[row], direct_min_p(x[row], p.min_p)), p.min_p


def test_filters_compose_in_order_top_k_then_top_p_then_min_p():
    x = logits(1, seed=3)[0]
    p = params(top_k=40, top_p=0.8, min_p=0.05, temperature=0.7)
    scaled = x / 0.7
    after_k = scaled.masked_fill(~direct_top_k(scaled, 40), float("-inf"))
    after_p = after_k.masked_fill(~direct_top_p(after_k, 0.8), float("-inf"))
    want = direct_min_p(after_p, 0.05) & (after_p > float("-inf"))
    assert torch.equal(keep_mask(x[None], [p])[0], want)


def test_penalties_match_direct_computation():
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(4))
    ps = [
        params(repetition_penalty=1.3),
        params(presence_penalty=0.5, frequency_penalty=0.25),
        params(),
    ]
    prompts = [[1, 2, 3], [4], [5]]
    outputs = [[3, 9, 9], [4, 8, 8, 8], [6]]
    got = apply_penalties(x, ps, prompts, outputs)
    want = x.clone()
    for t in {1, 2, 3, 9}:
        want[0, t] = x[0, t] / 1.3 if x[0, t] > 0 else x[0, t] * 1.3
    for t, count in {4: 1, 8: 3}.items():
        want[1, t] = x[1, t] - 0.5 - 0.25 * count
    assert torch.allclose(got, want, atol=1e-6) and torch.equal(got[2], x[2])


def test_logit_bias_adds_to_its_own_row_only():
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(6))
    ps = [params(logit_bias={7: 5.0, 11: -100}), params(), params(logit_bias=((7, -2.5),))]
    got = apply_logit_bias(x, ps)
    want = x.clone()
    want[0, 7] += 5.0
    want[0, 11] -= 100
    want[2, 7] -= 2.5
    assert torch.equal(got, want)
    assert torch.equal(apply_logit_bias(x[2:3], ps[2:]), got[2:3])  # the same alone as in the batch


def test_logit_bias_steers_sampling_the_same_alone_or_in_a_batch():
    x = logits(8, seed=7)
    ps = [params(temperature=0.7, logit_bias={3 * i: 100}) if i % 2 else params(temperature=0.7) for i in range(8)]
    sampler = Sampler()
    batch = sampler(x, ps, [torch.Generator().manual_seed(i) for i in range(8)], [[]] * 8, [[]] * 8)
    alone = [sampler(x[i : i + 1], [ps[i]], [torch.Generator().manual_seed(i)], [[]], [[]]).token_ids[0] for i in range(8)]
    assert batch.token_ids == alone
    assert [batch.token_ids[i] for i in range(1, 8, 2)] == [3 * i for i in range(1, 8, 2)]


@pytest.mark.parametrize("bias, needle", [({-1: 1.0}, "token ids"), ({5: 100.5}, r"\[-100, 100\]"), ({5: "x"}, "values")])
def test_bad_logit_bias_is_refused(bias, needle):
    with pytest.raises(InvalidParameterError, match=needle):
        SamplingParams(logit_bias=bias)


def test_samples_follow_the_filtered_distribution():
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = params(temperature=0.8, top_k=4, top_p=0.9)
    kept = keep_mask(x, [p])[0]
    probs = torch.softmax((x[0] / 0.8).masked_fill(~kept, float("-inf")), -1)
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler()
    draws = [sampler(x, [p], [gen], [[]], [[]]).token_ids[0] for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=6).float() / len(draws)
    assert set(draws) <= set(kept.nonzero()[:, 0].tolist())
    assert (freq - probs).abs().max() < 0.03


def test_rows_sample_the_same_alone_or_in_a_batch():
    x = logits(16, seed=5)
    ps = [params(temperature=0.5 + i / 10, top_k=[0, 5, 50][i % 3], top_p=[1.0, 0.9][i % 2]) for i in range(16)]
    ps[3] = params(temperature=0)
    sampler = Sampler()
    batch = sampler(x, ps, [torch.Generator().manual_seed(i) for i in range(16)], [[]] * 16, [[]] * 16)
    alone = [
        sampler(x[i : i + 1], [ps[i]], [torch.Generator().manual_seed(i)], [[]], [[]]).token_ids[0] for i in range(16)
    ]
    assert batch.token_ids == alone
    assert batch.token_ids[3] == int(x[3].argmax())


def test_logprobs_are_the_raw_distribution_with_the_top_tokens():
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(6))
    ps = [params(temperature=0, logprobs=3, repetition_penalty=2.0), params(logprobs=0)]
    out = Sampler()(x, ps, [torch.Generator(), torch.Generator().manual_seed(1)], [[1], [2]], [[], []])
    raw = torch.log_softmax(x, -1)
    for row in range(2):
        lp = out.logprobs[row]
        assert lp.token_id == out.token_ids[row]
        assert abs(lp.logprob - float(raw[row, lp.token_id])) < 1e-5
    top = raw[0].topk(3)
    assert [t for t, _ in out.logprobs[0].top] == top.indices.tolist()
    assert torch.allclose(torch.tensor([v for _, v in out.logprobs[0].top]), top.values)
    assert out.logprobs[1].top == ()


def test_greedy_tokens_follow_argmax_on_ties_nan_and_a_full_vocabulary():
    rows = torch.randn(6, 155008, generator=torch.Generator().manual_seed(3))
    rows[1, 17] = rows[1, 90000] = rows[1].max() + 1  # a tie: the first index wins
    rows[2] = 0.0  # all equal
    rows[3, 40] = rows[3, 5] = float("nan")  # NaN counts as the largest, the first one wins
    rows[4, -1] = float("inf")
    rows[5] = float("-inf")
    assert greedy_tokens(rows).tolist() == rows.argmax(dim=-1).tolist() == [int(rows[0].argmax()), 17, 0, 5, 155007, 0]
