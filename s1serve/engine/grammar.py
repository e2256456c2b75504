"""What the engine needs from a grammar engine, and applying its masks to logits.

The engine holds `Grammars` (compiles a request's Constraint, hands out one `Matcher` per sample, fills the masks
of a whole batch at once) and never the grammar library itself: engine/structured_output.py implements it with
llguidance, loaded on the first constrained request. A mask is a row of int32 words, bit j of word w = token
32*w + j allowed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from s1serve.constraints import Constraint


class Matcher(Protocol):
    """One sample's position in its grammar."""

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token; a token the grammar does not allow raises."""

    def is_finished(self) -> bool:
        """True once the grammar's end token was accepted: the constrained output is complete."""


class Grammars(Protocol):
    def validate(self, constraint: Constraint) -> None:
        """Raises a ValueError naming what is wrong when the constraint cannot be compiled."""

    def matcher(self, constraint: Constraint) -> Matcher: ...

    def fill_bitmasks(self, matchers: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor) -> None:
        """The allowed next tokens of each matcher into its row of `bitmask` ([rows, bitmask_width(vocab)])."""


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def check_bitmask(bitmask: torch.Tensor, vocab_size: int) -> None:
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError("a token bitmask is a contiguous int32 CPU tensor")
    if bitmask.shape[-1] != bitmask_width(vocab_size):
        raise ValueError(f"a token bitmask row has {bitmask_width(vocab_size)} int32 words, got {bitmask.shape[-1]}")


_BIT = torch.arange(32, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words [..., W] (bit j of word w = token 32*w + j) -> bool [..., vocab_size], on bitmask's device."""
    if bitmask.device.type == "cpu" and sys.byteorder == "little":
        # numpy unpacks bits ~50x faster than shifting 32 planes on the CPU
        raw = bitmask.contiguous().numpy().view(np.uint8)
        bits = torch.from_numpy(np.unpackbits(raw, axis=-1, bitorder="little"))
        return bits.view(torch.bool)[..., :vocab_size]
    shifts = _BIT.to(bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)[..., :vocab_size]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int) -> None:
    """In place: logits [..., V] (any device) get -inf where the bitmask [..., ceil(vocab_size / 32)] has a 0 bit
    and at every id >= vocab_size. Rows of a batch: logits [R, V] with bitmask [R, W] (see fill_bitmasks)."""
    allowed = bitmask_to_bool(bitmask.to(logits.device, non_blocking=True), vocab_size)
    n = min(vocab_size, logits.shape[-1])
    logits[..., :n].masked_fill_(~allowed[..., :n], float("-inf"))
    logits[..., n:] = float("-inf")
