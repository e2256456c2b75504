"""Logits -> next token ids, one row per sequence, each row with its own settings and random generator."""

from __future__ import annotations

import torch

from s1serve.sampling_params import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Sets to -inf every logit that top-k, top-p (nucleus) or min-p removes; logits is one row [vocab]."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the mass strictly before it is below top_p: the most likely token always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: float32 [B, vocab]; params must have every default filled in."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, p, gen, best in zip(logits, params, generators, greedy):
        if p.temperature == 0:
            out.append(best)
            continue
        row = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
        out.append(int(torch.multinomial(torch.softmax(row, dim=-1), 1, generator=gen)))
    return out
