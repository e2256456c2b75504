"""Reads published checkpoints: a safetensors index and its shards, memory-mapped, one tensor at a time.

Weights are copied straight from the mapped file into the model's (already allocated) parameters, so the model
is never held twice in memory.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from s1serve.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors of parts s1serve does not build yet are skipped, never silently misread.
IGNORED_PREFIXES = ("model.visual.",)


class CheckpointReader:
    """Name -> tensor access over the shards of one checkpoint folder."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.weight_map = self._read_weight_map()
        self._files: dict[str, object] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.model_dir / shard).is_file():
                    raise CheckpointError(f"{self.model_dir / shard}: shard listed in {INDEX_FILE} is missing")
            return weight_map
        single = self.model_dir / SINGLE_FILE
        if single.is_file():
            return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        raise CheckpointError(f"{self.model_dir}: no {INDEX_FILE} or {SINGLE_FILE}")

    def _open(self, filename: str):
        handle = self._files.get(filename)
        if handle is None:
            path = self.model_dir / filename
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
            self._files[filename] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> Iterable[str]:
        return self.weight_map.keys()

    def _file_of(self, name: str):
        handle = self._open(self.weight_map[name])
        if name not in handle.keys():
            raise CheckpointError(f"{self.model_dir / self.weight_map[name]}: index lists '{name}' but the shard lacks it")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file_of(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._file_of(name).get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{self.model_dir / self.weight_map[name]}: cannot read '{name}' ({exc})") from None


def load_into(targets: dict[str, torch.Tensor], reader: CheckpointReader) -> None:
    """Copies every checkpoint tensor into its target, shard by shard; names the first problem it meets."""
    missing = [name for name in targets if name not in reader]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{reader.model_dir}: missing tensor '{missing[0]}'{more}")
    unexpected = [n for n in reader.names() if n not in targets and not n.startswith(IGNORED_PREFIXES)]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{reader.model_dir}: unexpected tensor '{unexpected[0]}'{more}")
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in targets:
        by_file[reader.weight_map[name]].append(name)
    for filename in sorted(by_file):
        for name in by_file[filename]:
            dest = targets[name]
            shape = reader.shape(name)
            if shape != tuple(dest.shape):
                raise CheckpointError(
                    f"{reader.model_dir / filename}: tensor '{name}' has shape {list(shape)}, expected {list(dest.shape)}"
                )
            dest.copy_(reader.get(name))
