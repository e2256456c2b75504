"""FP8 checkpoints for tests, written by a few independent lines of plain torch (not s1serve's quantizer), and
their BF16 twins holding the dequantised weights.

The block arithmetic here is deliberately written out per block, from the format's definition
(../shared/docs/interns1_pro.md, "FP8 checkpoint"): scale = 2^ceil(log2(amax / 448)), fp8 = w / scale,
real value = fp8 * scale.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

QUANTISED = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$")
BLOCK = 128


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def quantise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One loop over the 128x128 blocks: (float8_e4m3fn values, float32 power-of-two scales)."""
    rows, cols = weight.shape
    w = weight.float()
    scales = torch.empty(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    values = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            scale = 2.0 ** math.ceil(math.log2(max(float(block.abs().max()), 1e-30) / 448.0))
            scales[i, j] = scale
            values[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / scale).to(torch.float8_e4m3fn)
    return values, scales


def dequantise(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out = values.float()
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] *= scales[i, j]
    return out


def _copy_side_files(src: Path, dst: Path) -> dict:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copyfile(path, dst / path.name)
    return json.loads((src / "config.json").read_text())


def write_plain_fp8(bf16_dir: Path, out: Path) -> Path:
    """`bf16_dir`'s checkpoint as FP8 in one model.safetensors, with a quantization_config like the published one."""
    config = _copy_side_files(bf16_dir, out)
    tensors, skipped = {}, set()
    for name, tensor in read_tensors(bf16_dir).items():
        if QUANTISED.search(name):
            tensors[name], tensors[name + "_scale_inv"] = quantise(tensor)
        else:
            tensors[name] = tensor
            skipped.add(name.rsplit(".", 1)[0])
    config["quantization_config"] = {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128], "modules_to_not_convert": sorted(skipped),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def write_dequantised_twin(fp8_dir: Path, out: Path) -> Path:
    """A BF16 checkpoint (no quantization_config) holding the dequantised weights of `fp8_dir`'s checkpoint."""
    config = _copy_side_files(fp8_dir, out)
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    stored = read_tensors(fp8_dir)
    tensors = {}
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = dequantise(tensor, stored[name + "_scale_inv"]).to(torch.bfloat16)
        tensors[name] = tensor
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def resident_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
