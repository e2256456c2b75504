"""s1serve's model against the naive reference in tests/reference_model.py (float32, CPU).

The naive reference is written from the spec alone (per-token loops, no cache, dense experts, FoPE from its
formula); test_golden.py checks it in turn against the model authors' code.
"""

from __future__ import annotations

import pytest
import torch

from reference_model import naive_logits

TOL = 1e-4  # max |logit difference| allowed in float32
VOCAB = 155008
NEW_TOKENS = 16


def _random_ids(n: int, seed: int, low: int = 0, high: int = VOCAB) -> list[int]:
    return torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = {
    "one_token": [151644],
    "short_random": _random_ids(17, seed=1),
    "repeated_token": [9707] * 40,  # identical keys everywhere: only the position encoding tells them apart
    "science_id_range": _random_ids(29, seed=2, low=151643),  # special tokens and SMILES/protein/DNA ids
    "long_random": _random_ids(333, seed=3),  # > 300 positions: FoPE at long range
}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_logits_match_naive_reference(name, tiny_llm, tiny_checkpoint):
    ids = PROMPTS[name]
    got = tiny_llm.prompt_logits(ids)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert got.shape == (len(ids), VOCAB)
    want = naive_logits(tiny_checkpoint, ids)
    diff = _max_diff(got, want)
    print(f"{name}: T={len(ids)} max|s1serve - naive| = {diff:.3e}")
    assert diff <= TOL, f"{name}: max |logit diff| {diff:.3e} > {TOL} over {len(ids)} positions"


def test_prefill_then_decode_equals_full_recomputation(tiny_llm, tiny_checkpoint):
    """Greedy ids from prefill + cached decode are the argmax of a full recomputation at every step."""
    from s1serve import SamplingParams

    names = ["short_random", "repeated_token", "long_random"]
    outs = tiny_llm.generate(
        prompt_token_ids=[PROMPTS[n] for n in names],
        sampling_params=SamplingParams(temperature=0, max_tokens=NEW_TOKENS),
    )
    assert len(outs) == len(names)
    for name, out in zip(names, outs):
        prompt, gen = PROMPTS[name], list(out.token_ids)
        assert len(gen) == NEW_TOKENS, f"{name}: {len(gen)} ids generated, asked for {NEW_TOKENS}"
        # Teacher forcing: one full pass over prompt + generated ids; position T-1+i must predict gen[i].
        full = prompt + gen[:-1]
        steps = list(range(len(prompt) - 1, len(full)))
        naive = naive_logits(tiny_checkpoint, full, positions=steps)
        assert naive.argmax(-1).tolist() == gen, f"{name}: cached greedy decode diverged from full recomputation"
        recomputed = tiny_llm.prompt_logits(full)[steps]
        assert recomputed.argmax(-1).tolist() == gen
        diff = _max_diff(recomputed, naive)
        print(f"{name}: {NEW_TOKENS} decode steps, max|s1serve full pass - naive| = {diff:.3e}")
        assert diff <= TOL
