"""Streamed safetensors files: read and write a checkpoint one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
padded with spaces to a multiple of 8, then the raw bytes. Output shapes and dtypes are known before any data
exists, so the writer plans shards and headers first and writes each tensor's bytes as soon as it is produced:
memory holds a few tensors, never a shard. The reader uses plain file reads, not mmap: mapped pages count as
resident memory until the whole file is closed.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from s1serve.checkpoint.loader import INDEX_FILE
from s1serve.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Unit:
    """Tensors produced by one call (a weight and its scales) and kept in one shard."""

    infos: tuple[TensorInfo, ...]
    produce: Callable[[], Sequence[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos)


class SafetensorsFile:
    """One safetensors file's header; `read` reads one tensor's bytes into a fresh tensor."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("rb")
        try:
            (length,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(length))
            header.pop("__metadata__", None)
            self.infos = {n: TensorInfo(n, DTYPES[h["dtype"]], tuple(h["shape"])) for n, h in header.items()}
            self._starts = {n: 8 + length + h["data_offsets"][0] for n, h in header.items()}
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            self._file.close()
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc!r})") from None

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self._file.seek(self._starts[name])
        if self._file.readinto(buf.numpy()) != info.nbytes:
            raise CheckpointError(f"{self.path}: truncated data of tensor '{name}'")
        return buf.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()


def plan_shards(units: Sequence[Unit], shard_bytes: int) -> list[list[Unit]]:
    """Consecutive units filled up to shard_bytes; a unit larger than that gets a shard of its own."""
    shards: list[list[Unit]] = [[]]
    size = 0
    for unit in units:
        if shards[-1] and size + unit.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.nbytes
    return shards


def write_shard(path: Path, units: Sequence[Unit]) -> None:
    """Writes the header, then each unit's tensors at their planned offsets as they are produced. Tensors are laid
    out by decreasing item size so that every one starts aligned to its dtype."""
    infos = sorted((i for u in units for i in u.infos), key=lambda i: -i.dtype.itemsize)
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    end = 0
    for info in infos:
        header[info.name] = {
            "dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape), "data_offsets": [end, end + info.nbytes]
        }
        end += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for unit in units:
            tensors = unit.produce()
            for info, tensor in zip(unit.infos, tensors, strict=True):
                if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
                    raise RuntimeError(f"{info.name}: produced {tensor.dtype} {list(tensor.shape)}, planned {info}")
                f.seek(8 + len(raw) + header[info.name]["data_offsets"][0])
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_sharded(out: Path, units: Sequence[Unit], shard_bytes: int) -> dict[str, str]:
    """model-0000i-of-0000n.safetensors and model.safetensors.index.json; returns the weight map."""
    shards = plan_shards(units, shard_bytes)
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out / filename, shard)
        weight_map.update({info.name: filename for unit in shard for info in unit.infos})
    index_doc = {"metadata": {"total_size": sum(u.nbytes for u in units)}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index_doc, indent=2))
    return weight_map
