"""The engine's n-gram speculative decoding (`--speculative-ngram-tokens K`): who drafts, how many, and the counts.

A decoding sequence is scheduled with its last token and up to K drafts from `NgramProposer`; one forward gives the
logits after each of them, and `verify_drafts` keeps the longest accepted run plus one token of the model's. On
CPU a decode step is bound by reading the weights, so verifying K + 1 tokens costs about one step: every accepted
draft is a step saved.

Not drafted for (they decode one token a step as before): requests with repetition/presence/frequency penalties
(each accepted token would change the next row's penalties), logprobs, or a grammar; the first token after a
prompt (its n samples fork from that row). Drafts never run past max_tokens or the model length: the step's K + 1
tokens always fit.
"""

from __future__ import annotations

import torch

from s1serve.engine.config import EngineConfig
from s1serve.engine.ngram_proposer import NgramProposer
from s1serve.engine.request import Sequence
from s1serve.layers.rejection_sampler import verify_drafts
from s1serve.sampling_params import SamplingParams


def drafts_allowed(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.logprobs is None
        and params.constraint is None
    )


class Speculation:
    def __init__(self, config: EngineConfig):
        self.proposer = NgramProposer(
            config.speculative_ngram_tokens, config.prompt_lookup_max, config.prompt_lookup_min
        )
        self.num_draft_tokens = 0  # drafts verified, since start
        self.num_accepted_tokens = 0  # of which accepted

    def propose(self, seq: Sequence, room: int) -> list[int]:
        """The drafts of a running sequence, at most `room` (what the step's token budget leaves)."""
        request, params = seq.request, seq.request.params
        decoding = seq.num_tokens - seq.num_computed_tokens == 1 and seq.num_tokens > seq.num_prompt_tokens
        if not decoding or not drafts_allowed(params):
            return []
        left = request.max_len - seq.num_tokens  # tokens it may still emit; the step emits one besides the drafts
        if params.max_tokens is not None:
            left = min(left, params.max_tokens - (seq.num_tokens - seq.num_prompt_tokens))
        return self.proposer.propose(seq.token_ids, min(room, left - 1))

    def verify(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[list[int]]:
        """Per sequence, its accepted drafts and the model's next token (logits: its 1 + drafts rows, in order)."""
        drafts = [seq.draft_ids for seq in seqs]
        tokens = verify_drafts(logits, drafts, [s.request.params for s in seqs], [s.generator for s in seqs])
        self.num_draft_tokens += sum(len(d) for d in drafts)
        self.num_accepted_tokens += sum(len(t) - 1 for t in tokens)
        return tokens
