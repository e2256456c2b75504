"""Requests and their sequences: the state the scheduler and block manager act on.

A request asks for `n` samples of one prompt. It starts as one sequence; when that sequence's prompt has been
computed, the engine forks it into n sequences that share the prompt's full KV blocks. A sequence's KV state is
`num_computed_tokens` of its `token_ids` (prompt + output) held in the blocks of `block_table`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from s1serve.engine.grammar import Matcher
from s1serve.engine.media import MediaInput
from s1serve.engine.prompt_logprobs import PromptLogprobs
from s1serve.engine.text_output import TextOutput
from s1serve.layers.sampler import TokenLogprob
from s1serve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # defaults filled in
    seed: int  # the generator seed of sample 0
    max_len: int  # prompt + output tokens never exceed this
    stop_ids: frozenset[int]  # tokens that end a sample with "stop" (eos unless ignore_eos, and stop_token_ids)
    sequences: list["Sequence"] = field(default_factory=list)
    media: tuple[MediaInput, ...] = ()  # images and videos whose features replace pad tokens of the prompt
    media_features: dict[int, torch.Tensor] = field(default_factory=dict)  # encoded items with pads left to compute
    prompt_logprobs: PromptLogprobs | None = None  # when the request asks for them

    def media_hash(self, start: int, end: int) -> bytes:
        """The keys of the media items with pads in positions [start, end): part of a KV block's hash."""
        return b"".join(m.key.encode() for m in self.media if m.start < end and m.end > start)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt positions remain to be scored (the prefix cache is skipped until none do)."""
        return self.prompt_logprobs is not None and self.prompt_logprobs.pending

    @property
    def finished(self) -> bool:
        """Samples are forked before any of them can finish, so this is never true too early."""
        return all(s.finished for s in self.sequences)

    def sample_seed(self, index: int) -> int:
        """Seed of sample `index`: the request seed for sample 0, a fixed mix of it for the others."""
        return (self.seed + index * 0x9E3779B97F4A7C15) % (1 << 63)


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    generator: torch.Generator
    text: TextOutput
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # content hashes of the leading full blocks
    num_cached_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache when the prompt was first admitted
    status: SequenceStatus = SequenceStatus.WAITING
    pending_forks: int = 0  # samples still to fork from this sequence once its prompt is computed
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the sample
    grammar: Matcher | None = None  # follows the request's constraint token by token
    draft_ids: list[int] = field(default_factory=list)  # drafts scheduled after its last token, this step only

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def next_tokens(self, n: int) -> list[int]:
        """The n tokens after those already computed."""
        return self.token_ids[self.num_computed_tokens : self.num_computed_tokens + n]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def slots(self) -> int:
        """Sequences this one will occupy once forked (for the --max-num-seqs cap)."""
        return 1 + self.pending_forks
