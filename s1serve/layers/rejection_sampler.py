"""Verifying draft tokens: the rows of one forward over (last token, drafts) -> the accepted drafts and one more.

A draft here is a point mass q = delta(d) (n-gram drafts have no distribution of their own). With p the row's
processed distribution (logit bias, temperature, top-k, top-p, min-p: the Sampler's), the draft is accepted with
probability min(1, p(d) / q(d)) = p(d); on rejection the token is drawn from max(0, p - q) renormalised, which is p
without d. The first rejection ends the run; if every draft is accepted, one more token is drawn from the last
row (the bonus). Each emitted token is then distributed exactly as p given the tokens before it, as in plain
sampling. A greedy row's p is the point mass on its argmax: drafts are accepted while they equal it, and the
argmax follows them, so greedy output is plain greedy decoding's.

Uniforms come from each sequence's own generator, so a seeded request is reproducible; its token stream is not
that of the same seed without drafts (the draws are spent differently), only its distribution is.
Penalties and logprobs are not handled here: the engine does not draft for requests that ask for them.
"""

from __future__ import annotations

import torch

from s1serve.layers.sampler import apply_logit_bias, filtered_candidates, greedy_tokens
from s1serve.sampling_params import SamplingParams


def verify_drafts(
    logits: torch.Tensor,
    drafts: list[list[int]],
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> list[list[int]]:
    """Per sequence, its accepted drafts followed by one token of the model's. logits: float32 [rows, vocab],
    sequence i owning 1 + len(drafts[i]) consecutive rows (row j predicts the token after draft j - 1)."""
    row_params = [p for p, d in zip(params, drafts) for _ in range(len(d) + 1)]
    logits = apply_logit_bias(logits, row_params)
    argmax = greedy_tokens(logits).tolist()
    sampled = [r for r, p in enumerate(row_params) if not p.greedy]
    if sampled:
        values, ids = filtered_candidates(logits[sampled], [row_params[r] for r in sampled])
        weights = (values - values[:, :1]).exp()  # unnormalised p over each row's candidates, -inf -> 0
        where = {r: k for k, r in enumerate(sampled)}
    out, start = [], 0
    for draft, p, generator in zip(drafts, params, generators):
        if p.greedy:
            model = argmax[start : start + len(draft) + 1]
            accepted = 0
            while accepted < len(draft) and model[accepted] == draft[accepted]:
                accepted += 1
            out.append(draft[:accepted] + [model[accepted]])
        else:
            rows = [where[start + j] for j in range(len(draft) + 1)]
            out.append(_verify_sampled(draft, rows, weights, ids, generator))
        start += len(draft) + 1
    return out


def _verify_sampled(
    draft: list[int], rows: list[int], weights: torch.Tensor, ids: torch.Tensor, generator: torch.Generator
) -> list[int]:
    tokens = []
    for token, row in zip(draft, rows):
        w, candidates = weights[row], ids[row]
        hit = candidates == token
        if torch.rand((), generator=generator) < (w * hit).sum() / w.sum():
            tokens.append(token)
            continue
        return tokens + [_draw(w.masked_fill(hit, 0.0), candidates, generator)]
    return tokens + [_draw(weights[rows[-1]], ids[rows[-1]], generator)]


def _draw(weights: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator) -> int:
    """One candidate with probability proportional to its weight (one uniform, inverted CDF, as the Sampler)."""
    cumulative = weights.cumsum(-1)
    target = torch.rand((), generator=generator).to(cumulative.dtype) * cumulative[-1]
    choice = torch.searchsorted(cumulative, target[None], right=True).clamp_(max=len(candidates) - 1)
    return int(candidates[choice])
