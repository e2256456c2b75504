"""Media in the engine: a request's processed images/videos, and the cache of their vision features.

A request carries its media as plain data (tensors and ints, so it pickles across a process boundary): per item
the processor's pixel patches, the grid, where its pad tokens sit in the prompt and a key of its content. The
engine encodes an item with the vision tower the first time a step reaches one of its pads (a prefix-cache hit
past the whole item never encodes it), keeps the features while pads of it are left to compute, and puts
them in a FeatureCache (LRU by key, bounded in bytes by --mm-processor-cache-gb) so that a later request with
the same picture does not encode it again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class MediaInput:
    """One image or video of a prompt, as the engine takes it (from s1serve.multimodal's ProcessedItem: its
    feature_key, pixel_values, grid_thw and pad_ranges)."""

    key: str  # identity of the features (sha256 of the bytes, the grid and the sampled frames)
    pixel_values: torch.Tensor  # float32 [t*h*w, patch dim]
    grid_thw: tuple[int, int, int]
    pad_ranges: tuple[tuple[int, int], ...]  # (start, length) runs of its pad tokens in the prompt, in order

    @classmethod
    def of(cls, item: Any) -> "MediaInput":
        """From a s1serve.multimodal ProcessedItem (read by its fields: the engine does not import multimodal)."""
        return cls(item.feature_key, item.pixel_values, tuple(item.grid_thw), tuple(item.pad_ranges))

    @property
    def num_pads(self) -> int:
        return sum(length for _, length in self.pad_ranges)

    @property
    def start(self) -> int:
        """Position of its first pad token."""
        return self.pad_ranges[0][0]

    @property
    def end(self) -> int:
        """One past the position of its last pad token."""
        start, length = self.pad_ranges[-1]
        return start + length

    def pad_positions(self) -> torch.Tensor:
        """Prompt positions of its pads, in feature-row order."""
        return torch.cat([torch.arange(start, start + length) for start, length in self.pad_ranges])

    def check(self, prompt: list[int], pad_ids: frozenset[int], merge: int) -> str | None:
        """What is wrong with this item against its prompt, or None."""
        t, h, w = self.grid_thw
        if self.pixel_values.ndim != 2 or self.pixel_values.shape[0] != t * h * w:
            return f"pixel_values {list(self.pixel_values.shape)} do not hold t*h*w = {t * h * w} patches"
        if self.num_pads * merge * merge != t * h * w:
            return f"{self.num_pads} pad tokens for grid {self.grid_thw}: it needs t*h*w/{merge * merge}"
        previous = 0
        for start, length in self.pad_ranges:
            if start < previous or length < 1 or start + length > len(prompt):
                return f"pad run ({start}, {length}) is out of order or outside the prompt ({len(prompt)} tokens)"
            if any(prompt[i] not in pad_ids for i in range(start, start + length)):
                return f"pad run ({start}, {length}) holds tokens other than the image/video pad ids"
            previous = start + length
        return None


class FeatureCache:
    """Vision features by media key, least recently used evicted first, at most `capacity_bytes` in all."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.size_bytes = 0
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        self.queries += 1
        features = self._entries.get(key)
        if features is not None:
            self.hits += 1
            self._entries.move_to_end(key)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.capacity_bytes or key in self._entries:
            return
        while self.size_bytes + size > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.size_bytes -= old.numel() * old.element_size()
        self._entries[key] = features
        self.size_bytes += size
