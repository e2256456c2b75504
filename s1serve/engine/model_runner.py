"""Runs one forward over a flat batch of sequences (prefill chunks and decode tokens together).

Each sequence in a step brings its new token ids, the number of its tokens already cached, and its block table;
the runner returns the logits of the last new token of the sequences that asked for them (of the last 1 + k new
tokens of a sequence verifying k draft tokens), and the scores of the prompt rows a sequence asks to have scored
(prompt logprobs, scored from the same full-vocabulary logits).

`Runner` is what the engine needs of a runner. `ModelRunner` runs the model in this process; the runners of
s1serve.distributed implement the same interface over many ranks: one that broadcasts each step to the other
ranks of a TP/EP engine, and one that keeps DP ranks whose MoE layers exchange tokens in lock-step (it "needs a
heartbeat": the engine loop ticks it even without work, and a step without forward runs the model's idle step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from s1serve.engine.config import EngineConfig, flag
from s1serve.engine.host_memory import bound_kernel_caches, place_on_huge_pages
from s1serve.engine.kv_cache import allocate_kv_cache, num_blocks_for_memory
from s1serve.engine.prompt_logprobs import PromptScoring, score_prompt_rows
from s1serve.layers import kernels
from s1serve.layers.attention import AttentionBatch, kernel_context
from s1serve.layers.sampler import TokenLogprob


@dataclass(frozen=True)
class StepSequence:
    token_ids: list[int]  # the new tokens of this step
    context_len: int  # tokens of this sequence already in the cache
    block_table: list[int]  # cache blocks holding (and to hold) this sequence, in order
    media_rows: tuple[int, ...] = ()  # which of the new tokens are image/video pads (offsets into token_ids)
    media_embeds: torch.Tensor | None = None  # [len(media_rows), hidden]: their vision features, in that order
    prompt_scoring: PromptScoring | None = None  # rows whose logits score the next prompt token (prompt logprobs)
    logits_rows: int = 1  # when it samples: logits of its last this-many new tokens (1 + drafts when verifying)


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor  # float32 [rows, vocab]: the last logits_rows new tokens' of each sequence that samples
    prompt_logprobs: list[list[TokenLogprob]]  # per step sequence: the scores of its prompt_scoring rows, else []


class Runner(Protocol):
    model: nn.Module  # this rank's model (shard)
    num_blocks: int  # KV-cache blocks (the same on every rank)
    block_size: int
    needs_heartbeat: bool  # the engine loop must tick (any_work, step) even when it has no requests

    def execute(self, seqs: list[StepSequence], logits_for: list[int]) -> StepOutput: ...

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor: ...

    def idle(self) -> None:
        """Called on a step that runs no forward."""

    def any_work(self, local: bool) -> bool:
        """Whether this rank or any rank it steps with has work (`local`: whether this rank has)."""

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Calls `callback` (from any thread) if the runner fails outside a step, e.g. a worker process dies."""

    def shutdown(self) -> None: ...


def kv_blocks_for(model: nn.Module, config: EngineConfig) -> int:
    """This rank's KV-cache blocks: --num-kv-blocks, else what --cache-max-entry-count leaves after the weights."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    param = next(model.parameters())
    num_blocks = num_blocks_for_memory(
        model.config.text, config.block_size, param.dtype, param.device, config.cache_max_entry_count,
        kv_heads=model.num_local_kv_heads,
    )
    if num_blocks < 1:
        raise ValueError(f"no memory left for the KV cache: lower the model size or set {flag('num_kv_blocks')}")
    return num_blocks


class ModelRunner:
    """Runs steps on the model of this process (the whole model, or a rank's shard driven from elsewhere)."""

    needs_heartbeat = False

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int):
        bound_kernel_caches()  # before this process's first forward
        # bf16 or FP8 weights, bf16 activations, a CPU with AVX512-BF16: the kernels' layout, from now on. The
        # activations take the embedding's dtype (FP8 weights do not tell it).
        kernels.pack_weights(model, model.embed_tokens.weight.dtype)
        place_on_huge_pages(model)  # each step streams them: fewer TLB misses
        param = next(model.parameters())
        self.model = model
        self.device = param.device
        self.dtype = param.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.caches = allocate_kv_cache(
            model.config.text, num_blocks, block_size, self.dtype, self.device, kv_heads=model.num_local_kv_heads
        )
        self.kernel_below = kernel_context(self.dtype, self.device, model.config.text.head_dim)

    @torch.inference_mode()
    def hidden_states(self, seqs: list[StepSequence]) -> torch.Tensor:
        """Final hidden states [total new tokens, hidden] of one step."""
        for seq in seqs:
            needed = -(-(seq.context_len + len(seq.token_ids)) // self.block_size)
            if len(seq.block_table) < needed:
                raise ValueError(f"block table holds {len(seq.block_table)} blocks, the sequence needs {needed}")
        batch = AttentionBatch.build(
            [len(s.token_ids) for s in seqs],
            [s.context_len for s in seqs],
            [s.block_table for s in seqs],
            self.block_size,
            self.device,
            self.kernel_below,
        )
        ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long).to(self.device)
        return self.model(ids, batch.positions, self.caches, batch, inputs_embeds=self._embeds(seqs, ids))

    def _embeds(self, seqs: list[StepSequence], ids: torch.Tensor) -> torch.Tensor | None:
        """The step's input embeddings with vision features at the media rows; None for a step of text only."""
        if not any(s.media_rows for s in seqs):
            return None
        rows, embeds, offset = [], [], 0
        for s in seqs:
            if s.media_rows:
                rows += [offset + r for r in s.media_rows]
                embeds.append(s.media_embeds)
            offset += len(s.token_ids)
        return self.model.embed(ids, torch.tensor(rows, dtype=torch.long), torch.cat(embeds).to(self.device))

    @torch.inference_mode()
    def execute(self, seqs: list[StepSequence], logits_for: list[int]) -> StepOutput:
        """Runs the step: logits at the last logits_rows new tokens of the sequences `logits_for`, in order, and
        the prompt rows' scores. (TP followers run the same calls, so that every rank meets the lm_head's
        all-gathers.)"""
        hidden = self.hidden_states(seqs)
        ends = torch.cumsum(torch.tensor([len(s.token_ids) for s in seqs]), 0).tolist()
        rows = [r for i in logits_for for r in range(ends[i] - seqs[i].logits_rows, ends[i])]
        logits = self.model.compute_logits(hidden[torch.tensor(rows, dtype=torch.long).to(self.device)])
        vocab = self.model.config.text.vocab_size
        return StepOutput(logits, score_prompt_rows(hidden, seqs, self.model.compute_logits, vocab))

    def last_logits(self, seqs: list[StepSequence]) -> torch.Tensor:
        """Float32 logits [num sequences, vocab] at each sequence's last new token."""
        return self.execute(seqs, list(range(len(seqs)))).logits

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits [len(token_ids), vocab] at every position of one prefill, in a cache of its own."""
        num_blocks = -(-len(token_ids) // self.block_size)
        scratch = ModelRunner(self.model, num_blocks, self.block_size)
        hidden = scratch.hidden_states([StepSequence(list(token_ids), 0, list(range(num_blocks)))])
        return self.model.compute_logits(hidden)

    def idle(self) -> None:
        pass

    def any_work(self, local: bool) -> bool:
        return local

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        pass  # a runner in this process fails inside its calls only

    def shutdown(self) -> None:
        pass
