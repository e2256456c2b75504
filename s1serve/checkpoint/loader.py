"""Reads published checkpoints: a safetensors index and its shards, memory-mapped, one tensor at a time.

Weights are copied straight from the mapped file into the model's (already allocated) parameters, so the model
is never held twice in memory. A sharded model asks for parts: a Target names the slice [start, stop) along one
dimension of a checkpoint tensor, and only that slice is read (safetensors `get_slice`), so no rank ever holds a
full copy of a tensor it splits. Tensors that other ranks load (experts of other EP ranks) are passed as
`elsewhere`: they are neither read, nor required, nor refused as unexpected. A model built without a vision tower
passes `ignored_prefixes` (VISION_PREFIX) so that a checkpoint's vision tensors do not make it refuse to load.
The reader takes checkpoints as their writers name them (huggingface_hub names index and shards after the
writer's filename_pattern; one file needs no index) and experts stored fused (fused_experts.py) as per-expert ones.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from s1serve.checkpoint.fp8 import FP8_DTYPE, SCALE_SUFFIX
from s1serve.checkpoint.fused_experts import is_fused, virtual_experts
from s1serve.errors import CheckpointError

FP8_SAFETENSORS_DTYPE = "F8_E4M3"

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
VISION_PREFIX = "model.visual."  # the vision tower's tensors


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
    """Name -> tensor access over the shards of one checkpoint folder. Fused expert tensors are presented as the
    per-expert tensors they hold (see fused_experts): `weight_map`, `names()`, `shape` and `get` know only those."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._files: dict[str, object] = {}
        self._keys: dict[str, frozenset[str]] = {}  # per shard: `keys()` lists them all, so ask once
        self._stored = self._read_weight_map()  # name -> file, as stored (fused expert tensors included)
        try:
            self._virtual = virtual_experts({n: self._stored_shape(n) for n in self._stored if is_fused(n)})
        except CheckpointError as exc:
            raise CheckpointError(f"{self.model_dir}: {exc}") from None
        twice = next((n for n in self._virtual if n in self._stored), None)
        if twice is not None:
            raise CheckpointError(f"{self.model_dir}: '{twice}' is stored both on its own and in a fused expert tensor")
        self.weight_map = {n: f for n, f in self._stored.items() if not is_fused(n)}
        self.weight_map.update({n: self._stored[part.source] for n, part in self._virtual.items()})
        self.bytes_read = 0  # tensor bytes read so far (parts count as the part)

    def _find(self, default: str, pattern: str) -> Path | None:
        """`default`, else the folder's one file matching `pattern`: huggingface_hub names shards and index after
        the writer's filename_pattern, so other names are in the wild."""
        if (self.model_dir / default).is_file():
            return self.model_dir / default
        found = sorted(self.model_dir.glob(pattern))
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(f"{self.model_dir}: no {default} and several files to take for it ({names})")
        return found[0] if found else None

    def _read_weight_map(self) -> dict[str, str]:
        index = self._find(INDEX_FILE, "*.safetensors.index.json")
        if index is not None:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.model_dir / shard).is_file():
                    raise CheckpointError(f"{self.model_dir / shard}: shard listed in {index.name} is missing")
            return weight_map
        single = self._find(SINGLE_FILE, "*.safetensors")
        if single is not None:
            return {name: single.name for name in self._open(single.name).keys()}
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
        filename = self._stored[name]
        handle = self._open(filename)
        if name not in self._keys[filename]:
            raise CheckpointError(f"{self.model_dir / filename}: index lists '{name}' but the shard lacks it")
        return handle

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file_of(name).get_slice(name).get_shape())

    def shape(self, name: str) -> tuple[int, ...]:
        part = self._virtual.get(name)
        return part.shape if part is not None else self._stored_shape(name)

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype ("BF16", "F8_E4M3", ...), read from the header only."""
        part = self._virtual.get(name)
        stored = part.source if part is not None else name
        return self._file_of(stored).get_slice(stored).get_dtype()

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The whole tensor, or (with dim) only its part [start, stop) along dim."""
        part = self._virtual.get(name)
        stored = part.source if part is not None else name
        try:
            if part is not None:
                tensor = part.read(self._file_of(stored).get_slice(stored), dim, start, stop)
            elif dim is None:
                tensor = self._file_of(name).get_tensor(name)
            else:
                tensor = self._file_of(name).get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]
        except SafetensorError as exc:
            raise CheckpointError(f"{self.model_dir / self._stored[stored]}: cannot read '{stored}' ({exc})") from None
        self.bytes_read += tensor.nbytes
        return tensor


def load_into(
    targets: dict[str, Target],
    reader: CheckpointReader,
    elsewhere: Collection[str] = (),
    ignored_prefixes: tuple[str, ...] = (),
) -> None:
    """Copies every checkpoint tensor (or its part) into its target, shard by shard; names the first problem it
    meets. `elsewhere`: names other ranks load, skipped here; `ignored_prefixes`: parts the model does not have."""
    missing = [name for name in targets if name not in reader]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{reader.model_dir}: missing tensor '{missing[0]}'{more}")
    unexpected = [
        n for n in reader.names()
        if n not in targets and n not in elsewhere and not (ignored_prefixes and n.startswith(ignored_prefixes))
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
            _check_dtype(reader, name, target, filename)
            target.dest.copy_(reader.get(name, target.dim, target.start, target.stop))


def _check_dtype(reader: CheckpointReader, name: str, target: Target, filename: str) -> None:
    """FP8 values go exactly where the config says FP8 weights are, and nowhere else (a copy would convert them
    silently, without their scales)."""
    stored = reader.dtype(name)
    want_fp8 = target.dest.dtype == FP8_DTYPE
    if want_fp8 and stored != FP8_SAFETENSORS_DTYPE:
        raise CheckpointError(
            f"{reader.model_dir / filename}: tensor '{name}' is stored as {stored}, but the config's "
            f"quantization_config makes it an FP8 weight ({FP8_SAFETENSORS_DTYPE}, with '{name}{SCALE_SUFFIX}')"
        )
    if not want_fp8 and stored.startswith("F8"):
        raise CheckpointError(
            f"{reader.model_dir / filename}: tensor '{name}' is stored as {stored}, but the config does not quantise "
            "it (no quantization_config, or the module is in modules_to_not_convert)"
        )
