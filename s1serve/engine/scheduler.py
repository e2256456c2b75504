"""Who computes what in the next step.

Running sequences go first, oldest first: each gets its next token (decode) or its next prompt chunk, within a token
budget per step. (A sequence is only admitted behind a prompt chunk that completed its prompt, so the decoding
sequences always come before the prefilling ones and no prompt chunk can starve a decode.) When blocks run out, the
newest running sequence is preempted: its blocks are freed and it goes back to the head of the queue, to be
recomputed later from its tokens (the prefix cache usually keeps most of them). A decoding sequence may bring draft
tokens to verify (speculative decoding): they count against the budget and get blocks like any new token, and are
dropped (not preempted for) when budget or blocks lack. Then waiting sequences are admitted first come, first served
while budget, blocks and the sequence cap allow; a long prompt is split into chunks over several steps. In a step
where some sequences decode, each prompt chunk is also held within a token and an attention-cost bound
(chunk_beside_decodes), so a long prompt does not stretch their inter-token latency; without decodes a running
prompt's chunk takes the budget but for the first chunk of the head of the queue, so that a request arriving during
a long prefill is admitted at once. A sequence alone that cannot get a block even after every other one was
preempted has outgrown the cache: it is reported as infeasible.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from s1serve.engine.block_manager import BlockManager
from s1serve.engine.config import EngineConfig
from s1serve.engine.request import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens incl. its drafts)
    preempted: list[Sequence] = field(default_factory=list)
    infeasible: list[Sequence] = field(default_factory=list)  # out of KV capacity on their own


# A running sequence and the most drafts the step has room for -> its drafts (none when it is not decoding).
Proposer = Callable[[Sequence, int], list[int]]


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, propose: Proposer | None = None):
        self.config = config
        self.blocks = block_manager
        self.propose = propose
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork: it holds shared blocks already and continues with the others."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drops a finished or aborted sequence and frees its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decoding = any(s.num_tokens - s.num_computed_tokens == 1 for s in self.running)
        # without decodes, a running prompt still leaves room for the head of the queue (else a long prompt running
        # alone would hold the whole budget, and a request arriving meanwhile would wait for all of its prefill)
        reserve = 0 if decoding or not self.waiting else self._first_chunk(self.waiting[0], budget)
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if decoding:
                num_new = chunk_beside_decodes(num_new, seq.num_computed_tokens, self.config)
            elif num_new > 1:
                num_new = max(1, min(num_new, budget - reserve))
            seq.draft_ids = self._drafts(seq, num_new, budget)
            num_new += len(seq.draft_ids)
            if not self._make_room(seq, seq.num_computed_tokens + num_new, out):
                break
            out.scheduled.append((seq, num_new))
            budget -= num_new
            index += 1

        slots = sum(s.slots for s in self.running)
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            if self.blocks.blocks_for(seq.num_tokens) > self.blocks.num_blocks:
                self.remove(seq)
                out.infeasible.append(seq)
                continue
            if slots + seq.slots > self.config.max_num_seqs:
                break
            cached = self.blocks.cached_prefix(seq)
            context = len(cached) * self.blocks.block_size
            num_new = min(seq.num_tokens - context, budget)
            if decoding:
                num_new = chunk_beside_decodes(num_new, context, self.config)
            if not self.blocks.can_admit(cached, num_new):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, cached)
            self.blocks.grow(seq, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            slots += seq.slots
            out.scheduled.append((seq, num_new))
            budget -= num_new
        return out

    def _first_chunk(self, seq: Sequence, budget: int) -> int:
        """The tokens a waiting sequence would ask for in its first step: its prompt, up to the bound of a chunk
        beside decodes (the head of the queue decodes soon after)."""
        num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
        return min(num_new, self.config.max_prefill_tokens_while_decoding or num_new)

    def _drafts(self, seq: Sequence, num_new: int, budget: int) -> list[int]:
        if self.propose is None or budget <= num_new:
            return []
        drafts = self.propose(seq, budget - num_new)
        if drafts and not self.blocks.can_grow(seq, seq.num_computed_tokens + num_new + len(drafts)):
            return []
        return drafts

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Grows seq to num_tokens, preempting the newest running sequences as needed; False if seq itself went."""
        while not self.blocks.can_grow(seq, num_tokens):
            victim = self.running[-1]
            if victim is seq and len(self.running) == 1:
                self.remove(seq)
                out.infeasible.append(seq)
                return False
            self.running.pop()
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free(seq)
        seq.draft_ids = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)


def chunk_beside_decodes(num_new: int, context: int, config: EngineConfig) -> int:
    """How many of num_new tokens after `context` computed ones a sequence computes in a step where others decode:
    at most --max-prefill-tokens-while-decoding, and at most as many as keep the chunk's attention, (tokens) x
    (context + tokens) pairs, within --max-prefill-pairs-while-decoding; at least one, so a prompt still advances.
    A decode (one token) is never cut."""
    if config.max_prefill_tokens_while_decoding:
        num_new = min(num_new, config.max_prefill_tokens_while_decoding)
    if config.max_prefill_pairs_while_decoding:
        pairs = config.max_prefill_pairs_while_decoding
        num_new = min(num_new, max(1, (math.isqrt(context * context + 4 * pairs) - context) // 2))
    return num_new
