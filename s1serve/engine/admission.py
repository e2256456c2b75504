"""Admission control: how much work an engine serving many clients takes on before it refuses more.

The engine runs in its own process behind one or more API server processes, so the bound that must hold for the
engine as a whole is checked where its queue is known: in the engine loop, as each request arrives (EngineCore,
AsyncEngine), before Engine.add_request. Two limits, both answered with QueueFullError (HTTP 429 + Retry-After):
- requests: at most `max_num_seqs + max_num_queued_reqs` unfinished requests, i.e. a full batch running and
  `--max-num-queued-reqs` more waiting for a slot;
- tokens: at most `--max-num-queued-tokens` prompt tokens still to be computed by waiting sequences, so a burst of
  long prompts cannot queue more work than the KV cache holds at once.
A refusal in the engine costs one round trip, which waits for the step in progress. So each engine client also
refuses at once, before sending, when its own open requests already reach the request limit (`check_open`): with
one API server that check fires first, and a client is answered 429 without waiting on the engine. The offline
`LLM` does not go through admission: it queues whatever it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from s1serve.engine.config import EngineConfig, flag
from s1serve.engine.request import Sequence

RETRY_AFTER_S = 1  # what a refused client is told to wait (the Retry-After header)
QUEUED_REQS_PER_SEQ = 4  # default --max-num-queued-reqs: this many times --max-num-seqs


class QueueFullError(RuntimeError):
    """The engine is at its admission limit; the request itself is fine (not a ValueError: never a 400)."""


@dataclass(frozen=True)
class Admission:
    max_open_requests: int  # running + waiting requests
    max_queued_requests: int
    max_queued_tokens: int

    @classmethod
    def for_engine(cls, config: EngineConfig, num_blocks: int, max_model_len: int) -> "Admission":
        """The limits of `config`; unset ones fit the engine: a queue of a few batches, and at most as many
        queued prompt tokens as the KV cache holds (never fewer than one whole context)."""
        queued = config.max_num_queued_reqs
        if queued is None:
            queued = QUEUED_REQS_PER_SEQ * config.max_num_seqs
        tokens = config.max_num_queued_tokens
        if tokens is None:
            tokens = max(num_blocks * config.block_size, max_model_len)
        return cls(config.max_num_seqs + queued, queued, tokens)

    def check_open(self, num_open: int) -> None:
        """QueueFullError when `num_open` requests already fill every running slot and the whole queue."""
        if num_open >= self.max_open_requests:
            raise QueueFullError(
                f"the server is busy: {num_open} requests are running or queued, the most it takes "
                f"({flag('max_num_seqs')} + {flag('max_num_queued_reqs')} = {self.max_open_requests}); "
                f"retry after {RETRY_AFTER_S} s"
            )

    def check(self, num_open: int, waiting: Iterable[Sequence], num_prompt_tokens: int) -> None:
        """The engine's check of a new request with `num_prompt_tokens`: `num_open` unfinished requests, and
        the sequences waiting for a slot. A prompt alone larger than the token limit is taken when nothing waits."""
        self.check_open(num_open)
        queued = sum(seq.num_tokens - seq.num_computed_tokens for seq in waiting)
        if queued and queued + num_prompt_tokens > self.max_queued_tokens:
            raise QueueFullError(
                f"the server is busy: {queued} prompt tokens are queued and this request brings "
                f"{num_prompt_tokens}, over {flag('max_num_queued_tokens')} ({self.max_queued_tokens}); "
                f"retry after {RETRY_AFTER_S} s"
            )
