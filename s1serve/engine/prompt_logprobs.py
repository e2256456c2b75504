"""Prompt logprobs (vLLM's `prompt_logprobs`): which rows of a prefill step score which prompt tokens, scoring
them in bounded row slices, and a request's scores until they go out with its first output.

The logits at prompt position i predict token i + 1, so a prompt of L tokens has L - 1 scored positions; the list
handed out starts with None for the first token. Scores are those of the sampled-token logprobs
(`layers.sampler.token_logprobs`: float32 log_softmax of the full-vocabulary logits, rank, top k). A request that
asks for them takes no blocks from the prefix cache while positions remain to score (a cached block has no
logits: its positions would be missing), as vLLM does; its own computed blocks still go into the cache for others.
A preempted request recomputes its prompt from the start and scores only the positions it has not scored yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from s1serve.layers.sampler import TokenLogprob, token_logprobs

# Logits elements scored at once: rows per slice = this // vocab (108 rows of a 155008-token vocabulary, 64 MiB of
# float32 logits), so a long prefill chunk never holds [chunk, vocab] logits.
SLICE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class PromptScoring:
    """Rows of one step sequence's new tokens whose logits score the next prompt token."""

    first_row: int  # offset into the step sequence's new tokens of the first scored row
    targets: tuple[int, ...]  # row first_row + i scores targets[i], the prompt token after it
    k: int  # top candidates kept per row


@dataclass(eq=False)
class PromptLogprobs:
    """One request's prompt scores as they are computed, handed out once, whole."""

    prompt: list[int]
    k: int
    scored: list[TokenLogprob] = field(default_factory=list)  # of prompt tokens 1, 2, ... so far
    sent: bool = False

    @property
    def pending(self) -> bool:
        return len(self.scored) < len(self.prompt) - 1

    def rows(self, start: int, n: int) -> PromptScoring | None:
        """The rows among new tokens [start, start + n) still to score. The prefix cache is skipped while any are
        pending, so start never passes the scored positions."""
        first = max(start, len(self.scored))
        end = min(start + n, len(self.prompt) - 1)
        if first >= end:
            return None
        return PromptScoring(first - start, tuple(self.prompt[first + 1 : end + 1]), self.k)

    def add(self, scores: list[TokenLogprob]) -> None:
        self.scored += scores

    def take(self) -> list[TokenLogprob | None] | None:
        """The whole list (None, then one entry per later prompt token) the first time it is complete, else None."""
        if self.sent or self.pending:
            return None
        self.sent = True
        return [None, *self.scored]


class Scored(Protocol):
    token_ids: list[int]
    prompt_scoring: PromptScoring | None


def score_prompt_rows(
    hidden: torch.Tensor, seqs: list[Scored], compute_logits: Callable[[torch.Tensor], torch.Tensor], vocab_size: int
) -> list[list[TokenLogprob]]:
    """Per step sequence, the scores of its PromptScoring rows ([] without one). hidden: the step's final hidden
    states [total new tokens, hidden]; compute_logits: the model's (full-vocabulary float32 logits on every rank)."""
    rows: list[int] = []
    targets: list[int] = []
    ks: list[int] = []
    owners: list[int] = []
    offset = 0
    for j, seq in enumerate(seqs):
        scoring = seq.prompt_scoring
        if scoring is not None:
            first = offset + scoring.first_row
            rows += range(first, first + len(scoring.targets))
            targets += scoring.targets
            ks += [scoring.k] * len(scoring.targets)
            owners += [j] * len(scoring.targets)
        offset += len(seq.token_ids)
    out: list[list[TokenLogprob]] = [[] for _ in seqs]
    if not rows:
        return out
    index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
    per_slice = max(1, SLICE_ELEMENTS // vocab_size)
    for start in range(0, len(rows), per_slice):
        end = start + per_slice
        scores = token_logprobs(compute_logits(hidden[index[start:end]]), targets[start:end], ks[start:end])
        for owner, score in zip(owners[start:end], scores):
            out[owner].append(score)
    return out
