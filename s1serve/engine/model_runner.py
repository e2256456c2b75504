"""Runs one forward over a flat batch of sequences (prefill chunks and decode tokens together).

Each sequence in a step brings its new token ids, the number of its tokens already cached, and its block table;
the runner returns the logits of the last new token of the sequences that asked for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from s1serve.engine.kv_cache import allocate_kv_cache
from s1serve.layers.attention import AttentionBatch


@dataclass(frozen=True)
class StepSequence:
    token_ids: list[int]  # the new tokens of this step
    context_len: int  # tokens of this sequence already in the cache
    block_table: list[int]  # cache blocks holding (and to hold) this sequence, in order


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int):
        param = next(model.parameters())
        self.model = model
        self.device = param.device
        self.dtype = param.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.caches = allocate_kv_cache(model.config.text, num_blocks, block_size, self.dtype, self.device)

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
        )
        ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long).to(self.device)
        return self.model(ids, batch.positions, self.caches, batch)

    @torch.inference_mode()
    def execute(self, seqs: list[StepSequence], logits_for: list[int]) -> torch.Tensor:
        """Runs the step; float32 logits [len(logits_for), vocab] at the last new token of those sequences."""
        hidden = self.hidden_states(seqs)
        ends = torch.cumsum(torch.tensor([len(s.token_ids) for s in seqs]), 0) - 1
        return self.model.compute_logits(hidden[ends[logits_for].to(self.device)])

    def last_logits(self, seqs: list[StepSequence]) -> torch.Tensor:
        """Float32 logits [num sequences, vocab] at each sequence's last new token."""
        return self.execute(seqs, list(range(len(seqs))))
