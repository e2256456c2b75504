"""`s1serve quantize SRC DST`: a BF16 checkpoint -> the published FP8 layout (see fp8.py), streamed.

Which modules are quantised follows the published rule, by name: the text decoder's attention projections and
MLP/expert projections. Routers, norms, embeddings, lm_head, rotary coefficients and the whole vision tower keep
their dtype and are listed in `modules_to_not_convert`. Tensors are read, quantised and written one at a time
(stream.py), so memory holds a few tensors whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from s1serve.checkpoint.fp8 import BLOCK, FP8_DTYPE, quantize_blocks, scale_name, scale_shape
from s1serve.checkpoint.loader import VISION_PREFIX, CheckpointReader
from s1serve.checkpoint.stream import DTYPES, SafetensorsFile, TensorInfo, Unit, write_sharded
from s1serve.config import load_model_config
from s1serve.errors import CheckpointError, ConfigError

_QUANTISED = re.compile(r"\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$")
DEFAULT_SHARD_SIZE = "5GB"
WEIGHT_FILES = (".safetensors", ".safetensors.index.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 1 << 10, "MIB": 1 << 20,
          "GIB": 1 << 30, "TIB": 1 << 40}


def is_quantised(info: TensorInfo) -> bool:
    """The published rule, by name: 2-D text decoder attention and MLP/expert projection weights."""
    return len(info.shape) == 2 and not info.name.startswith(VISION_PREFIX) and bool(_QUANTISED.search(info.name))


def module_of(name: str) -> str:
    """`model.language_model.norm.weight` -> `model.language_model.norm` (the names modules_to_not_convert lists)."""
    return name.rpartition(".")[0] or name


def quantization_config(infos: Iterable[TensorInfo]) -> dict[str, Any]:
    """The published quantization_config for a checkpoint of these (source) tensors."""
    quantised: set[str] = set()
    kept: set[str] = set()
    for info in infos:
        (quantised if is_quantised(info) else kept).add(module_of(info.name))
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": sorted(kept - quantised),
    }


def fp8_unit(info: TensorInfo, load: Callable[[], torch.Tensor], where: str) -> Unit:
    """What one source tensor becomes: its FP8 weight and scales when the rule quantises it, else itself."""
    if not is_quantised(info):
        return Unit((info,), lambda: (load(),))
    if not info.dtype.is_floating_point:
        raise CheckpointError(
            f"{where}: tensor '{info.name}' is {info.dtype}; only floating-point weights can be quantised"
        )
    outputs = (
        TensorInfo(info.name, FP8_DTYPE, info.shape),
        TensorInfo(scale_name(info.name), torch.float32, scale_shape(info.shape)),
    )
    return Unit(outputs, lambda: quantize_blocks(load()))


def parse_size(text: str) -> int:
    """`5GB` (decimal, as huggingface writes shard sizes), `512MiB` (binary) or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].upper() not in _UNITS or float(match[1]) <= 0:
        raise ValueError(f"bad size {text!r} (expected e.g. 5GB, 512MiB or a number of bytes)")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def _source(
    reader: CheckpointReader, file: SafetensorsFile, name: str
) -> tuple[TensorInfo, Callable[[], torch.Tensor]]:
    """A source tensor's info and reader. Stored tensors are read with plain file reads (stream.py says why); a
    per-expert tensor the reader serves out of a fused expert tensor (fused_experts.py) is read through it."""
    if name in file.infos:
        return file.infos[name], lambda: file.read(name)
    info = TensorInfo(name, DTYPES[reader.dtype(name)], reader.shape(name))
    return info, lambda: reader.get(name)


def _check_destination(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: destination exists and is not an empty folder")


DEFAULT_SHARD_BYTES = parse_size(DEFAULT_SHARD_SIZE)


def quantize_checkpoint(src: str | Path, dst: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Writes the FP8 checkpoint of `src` to `dst` (weights, index, config with quantization_config, every other
    file of src) and returns dst. dst appears only when complete."""
    src, dst = Path(src), Path(dst)
    load_model_config(src)  # names a missing folder, a missing or bad config.json
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ConfigError(f"{src / 'config.json'}: the checkpoint is already quantised (it has a quantization_config)")
    reader = CheckpointReader(src)
    _check_destination(dst)
    with ExitStack() as stack:
        files: dict[str, SafetensorsFile] = {}
        for filename in sorted(set(reader.weight_map.values())):
            files[filename] = SafetensorsFile(src / filename)
            stack.callback(files[filename].close)
        sources = [_source(reader, files[filename], name) for name, filename in reader.weight_map.items()]
        bar = stack.enter_context(
            tqdm(total=sum(i.nbytes for i, _ in sources), unit="B", unit_scale=True, desc="quantize", disable=None)
        )

        def counted(load: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
            def load_and_count() -> torch.Tensor:
                tensor = load()
                bar.update(tensor.nbytes)
                return tensor

            return load_and_count

        units = [
            fp8_unit(info, counted(load), str(src / reader.weight_map[info.name])) for info, load in sources
        ]
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            write_sharded(staging, units, shard_bytes)
            config["quantization_config"] = quantization_config(info for info, _ in sources)
            (staging / "config.json").write_text(json.dumps(config, indent=2))
            for path in sorted(src.iterdir()):
                if path.is_file() and not path.name.endswith(WEIGHT_FILES) and path.name != "config.json":
                    shutil.copyfile(path, staging / path.name)
            if dst.exists():
                dst.rmdir()
            staging.rename(dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return dst
