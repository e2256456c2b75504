"""Logits -> next token ids for a batch of rows, each with its own settings and random generator.

Order of operations (as in HF transformers): penalties, then greedy argmax or temperature, top-k, top-p, min-p,
each filter acting on what the previous ones kept. Filtering works on the candidates sorted by logit (the top
max-k of the batch, or the whole vocabulary when a row has no top-k), all rows at once. A sampled row draws one
uniform number from its own generator and inverts the cumulative distribution of its candidates: every
operation on a row is independent of the other rows, so a seeded request samples the same tokens in any batch.
Logprobs are those of the model's raw distribution (before penalties, temperature and filters); `token_logprobs`
also scores prompt tokens (the engine's prompt logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from s1serve.layers import kernels
from s1serve.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token under the model's raw distribution, with the most likely ones."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first
    rank: int  # 1 + the number of other tokens at least as likely (vLLM's rank: 1 for the most likely)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # per row; None where the row asked for none


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)[:, None]


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]]
) -> torch.Tensor:
    """Repetition penalty on tokens seen in prompt or output (divides positive logits, multiplies negative ones);
    presence and frequency penalties on output tokens (subtract p once, f per occurrence)."""
    rows = [
        i
        for i, p in enumerate(params)
        if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
    ]
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device

    def counts(ids: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(x) for x in ids))
        padded = torch.full((len(ids), width), vocab, dtype=torch.long)  # padding lands in a dropped column
        for r, x in enumerate(ids):
            padded[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        out = torch.zeros(len(ids), vocab + 1, dtype=torch.float32)
        return out.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))[:, :vocab].to(device)

    out_counts = counts([output_ids[i] for i in rows])
    seen = (out_counts > 0) | (counts([prompt_ids[i] for i in rows]) > 0)
    sub = logits[rows]
    rep = _column([params[i].repetition_penalty for i in rows], sub)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - _column([params[i].frequency_penalty for i in rows], sub) * out_counts
    sub = sub - _column([params[i].presence_penalty for i in rows], sub) * (out_counts > 0)
    logits = logits.clone()
    logits[rows] = sub
    return logits


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Adds each row's own logit_bias to its logits; a row's result never depends on the other rows."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        ids = torch.tensor([t for t, _ in params[i].logit_bias], dtype=torch.long, device=logits.device)
        bias = torch.tensor([b for _, b in params[i].logit_bias], dtype=logits.dtype, device=logits.device)
        logits[i].index_add_(0, ids, bias)
    return logits


def filtered_candidates(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled candidate logits [R, C] sorted descending, with those top-k, top-p or min-p remove set
    to -inf, and their token ids [R, C]. logits: float32 [R, vocab]; no row may be greedy."""
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    x = logits / _column([p.temperature for p in params], logits)
    width = max(ks)
    values, ids = x.topk(width, dim=-1) if width < vocab else x.sort(dim=-1, descending=True)
    rank = torch.arange(width, device=x.device)[None, :]
    values = values.masked_fill(rank >= torch.tensor(ks, device=x.device)[:, None], float("-inf"))

    # Probabilities relative to the top candidate; -inf gives 0.
    weight = (values - values[:, :1]).exp()
    cumulative = weight.cumsum(-1)
    top_p = _column([p.top_p for p in params], x)
    # Keep a candidate while the mass strictly before it is below top_p: the most likely one always stays.
    drop = ((cumulative - weight) >= top_p * cumulative[:, -1:]) & (top_p < 1.0)
    drop |= weight < _column([p.min_p for p in params], x)  # p_i / p_max < min_p, unchanged by renormalising
    return values.masked_fill(drop, float("-inf")), ids


def keep_mask(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[R, vocab] bool: the tokens a sampled row may draw after top-k, top-p and min-p."""
    values, ids = filtered_candidates(logits, params)
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, values > float("-inf"))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest logit (argmax's rule). On CPU torch.argmax over a 155k vocabulary cost
    ~0.2 ms a row on one thread (1.6 ms for 32 rows through torch.max): the kernels' scan takes the rows over every
    thread at memory speed; elsewhere torch.max over the dim, ~3x faster than argmax, same rule."""
    compiled = kernels.cpu_kernels(logits.device)
    if compiled is not None and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] > 0:
        return compiled.greedy(logits)
    return logits.max(dim=-1).indices


class Sampler:
    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
    ) -> SamplerOutput:
        """logits: float32 [R, vocab], one row per sequence; params have their defaults filled in."""
        raw = logits
        logits = apply_logit_bias(apply_penalties(logits, params, prompt_ids, output_ids), params)
        tokens = greedy_tokens(logits)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            values, ids = filtered_candidates(logits[rows], [params[i] for i in rows])
            cumulative = (values - values[:, :1]).exp().cumsum(-1)
            uniform = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(logits.device)
            target = uniform[:, None].to(cumulative.dtype) * cumulative[:, -1:]
            choice = torch.searchsorted(cumulative, target, right=True).clamp_(max=values.shape[1] - 1)
            tokens[rows] = ids.gather(1, choice)[:, 0]
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw, params, token_ids))

    @staticmethod
    def _logprobs(raw: torch.Tensor, params: list[SamplingParams], token_ids: list[int]) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None] * len(params)
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if rows:
            scored = token_logprobs(raw[rows], [token_ids[i] for i in rows], [params[i].logprobs for i in rows])
            for i, logprob in zip(rows, scored):
                out[i] = logprob
        return out


def token_logprobs(logits: torch.Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Row r's token_ids[r] scored under log_softmax(logits[r]) in float32, with its rank and the ks[r] most
    likely tokens. logits: [R, vocab]; the caller bounds R (the work is a few [R, vocab] float32 tensors)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logits.device)[:, None])
    ranks = (logprobs >= chosen).sum(dim=-1).tolist()
    width = max(ks)
    top_values, top_ids = logprobs.topk(width, dim=-1) if width else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids, chosen_values = top_values.tolist(), top_ids.tolist(), chosen[:, 0].tolist()
    return [
        TokenLogprob(token_ids[r], chosen_values[r], tuple(zip(top_ids[r][:k], top_values[r][:k])), ranks[r])
        for r, k in enumerate(ks)
    ]
