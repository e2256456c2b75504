"""Reads published checkpoints: a safetensors index and its shards, memory-mapped, one tensor at a time.

Weights are copied straight from the mapped file into the model's (already allocated) parameters, so the model
is never held twice in memory. A sharded model asks for parts: a Target names the slice [start, stop) along one
dimension of a checkpoint tensor, and only that slice is read (safetensors `get_slice`), so no rank ever holds a
full copy of a tensor it splits. Tensors that other ranks load (experts of other EP ranks) are passed as
`elsewhere`: they are neither read, nor required, nor refused as unexpected.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from s1serve.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors of parts s1serve does not build yet are skipped, never silently misread.
IGNORED_PREFIXES = ("model.visual.",)


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor of full shape `shape` goes: `dest` receives all of it (dim None) or the part
    [start, stop) along `dim`."""

    dest: torch.Tensor
    shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @classmethod
    def whole(cls, dest: torch.Tensor) -> "Target":
        return cls(dest, tuple(dest.shape))

    @classmethod
    def part(cls, dest: torch.Tensor, shape: tuple[int, ...], dim: int, part: range) -> "Target":
        if len(part) == shape[dim]:
            return cls(dest, tuple(shape))
        return cls(dest, tuple(shape), dim, part.start, part.stop)


class CheckpointReader:
    """Name -> tensor access over the shards of one checkpoint folder."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._files: dict[str, object] = {}
        self._keys: dict[str, frozenset[str]] = {}  # per shard: `keys()` lists them all, so ask once
        self.weight_map = self._read_weight_map()
        self.bytes_read = 0  # tensor bytes read so far (parts count as the part)

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
            self._keys[filename] = frozenset(handle.keys())
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> Iterable[str]:
        return self.weight_map.keys()

    def _file_of(self, name: str):
        filename = self.weight_map[name]
        handle = self._open(filename)
        if name not in self._keys[filename]:
            raise CheckpointError(f"{self.model_dir / self.weight_map[name]}: index lists '{name}' but the shard lacks it")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file_of(name).get_slice(name).get_shape())

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The whole tensor, or (with dim) only its part [start, stop) along dim."""
        try:
            if dim is None:
                tensor = self._file_of(name).get_tensor(name)
            else:
                tensor = self._file_of(name).get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]
        except SafetensorError as exc:
            raise CheckpointError(f"{self.model_dir / self.weight_map[name]}: cannot read '{name}' ({exc})") from None
        self.bytes_read += tensor.nbytes
        return tensor


def load_into(targets: dict[str, Target], reader: CheckpointReader, elsewhere: Collection[str] = ()) -> None:
    """Copies every checkpoint tensor (or its part) into its target, shard by shard; names the first problem it
    meets. `elsewhere`: names other ranks load, skipped here."""
    missing = [name for name in targets if name not in reader]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{reader.model_dir}: missing tensor '{missing[0]}'{more}")
    unexpected = [
        n for n in reader.names() if n not in targets and n not in elsewhere and not n.startswith(IGNORED_PREFIXES)
    ]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{reader.model_dir}: unexpected tensor '{unexpected[0]}'{more}")
    by_file: dict[str, list[str]] = defaultdict(list)
    for name in targets:
        by_file[reader.weight_map[name]].append(name)
    for filename in sorted(by_file):
        for name in by_file[filename]:
            target = targets[name]
            shape = reader.shape(name)
            if shape != target.shape:
                raise CheckpointError(
                    f"{reader.model_dir / filename}: tensor '{name}' has shape {list(shape)}, "
                    f"expected {list(target.shape)}"
                )
            target.dest.copy_(reader.get(name, target.dim, target.start, target.stop))
