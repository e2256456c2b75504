"""The vision tower loads from the published names (model.visual.*), stays BF16 in FP8 checkpoints, is whole on
every TP/EP rank, and a checkpoint without vision weights loads text-only and says so."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from s1serve.checkpoint.loader import VISION_PREFIX
from s1serve.checkpoint.tiny import write_tiny_checkpoint
from s1serve.parallel.context import ParallelContext
from s1serve.errors import CheckpointError, ConfigError
from s1serve.models.registry import load_model

INDEX = "model.safetensors.index.json"


def stored_vision_tensors(folder: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    out = {}
    for name, shard in weight_map.items():
        if name.startswith(VISION_PREFIX):
            with safe_open(str(folder / shard), "pt") as f:
                out[name] = f.get_tensor(name)
    return out


def held_vision_tensors(model) -> dict[str, torch.Tensor]:
    return {VISION_PREFIX + n: p for n, p in model.visual.named_parameters()}


def rewrite_without(folder: Path, out: Path, drop) -> Path:
    """A copy of the checkpoint folder without the tensors `drop(name)` selects."""
    shutil.copytree(folder, out)
    index = json.loads((out / INDEX).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(out / shard))
        save_file({n: t for n, t in tensors.items() if not drop(n)}, str(out / shard), metadata={"format": "pt"})
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if not drop(n)}
    (out / INDEX).write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path):
    return load_model(tiny_checkpoint, "float32")


def test_every_vision_tensor_is_loaded_as_stored(tiny_checkpoint: Path, model):
    stored = stored_vision_tensors(tiny_checkpoint)
    held = held_vision_tensors(model)
    # patch embedding and position table, 2 blocks of 12 tensors, the merger
    assert model.has_vision and set(held) == set(stored) and len(stored) == 3 + 12 * 2 + 6
    for name, tensor in stored.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(held[name], tensor.float()), name


def test_a_checkpoint_without_vision_weights_loads_text_only_and_says_so(tiny_checkpoint, model, tmp_path, caplog):
    folder = rewrite_without(tiny_checkpoint, tmp_path / "text_only", lambda n: n.startswith(VISION_PREFIX))
    with caplog.at_level(logging.WARNING, logger="s1serve.models"):
        text_only = load_model(folder, "float32")
    assert not text_only.has_vision and text_only.visual is None
    assert "holds no model.visual.* tensors: loading the text decoder only" in caplog.text
    with pytest.raises(ConfigError, match="this checkpoint has no vision tower"):
        text_only.encode_images(torch.zeros(4, 1536), torch.tensor([[1, 2, 2]]))
    ids = torch.arange(5)
    assert torch.equal(text_only.embed(ids), model.embed(ids))


def test_a_config_without_vision_config_ignores_the_vision_tensors(tiny_checkpoint, tmp_path):
    folder = tmp_path / "no_vision_config"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["vision_config"]
    (folder / "config.json").write_text(json.dumps(config))
    assert not load_model(folder, "float32").has_vision


def test_a_checkpoint_missing_part_of_the_tower_is_refused(tiny_checkpoint, tmp_path):
    name = f"{VISION_PREFIX}blocks.1.attn.qkv.bias"
    folder = rewrite_without(tiny_checkpoint, tmp_path / "partial", lambda n: n == name)
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        load_model(folder, "float32")


def test_fp8_checkpoints_keep_the_vision_tower_in_bf16(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "edge_fp8", preset="edge", seed=1, fp8=True)
    skip = set(json.loads((folder / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    stored = stored_vision_tensors(folder)
    assert stored and all(t.dtype == torch.bfloat16 for t in stored.values())
    assert {n.rpartition(".")[0] for n in stored} <= skip
    loaded = load_model(folder, "bfloat16")
    for name, tensor in held_vision_tensors(loaded).items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, stored[name]), name


@pytest.mark.parametrize(
    "parallel",
    [ParallelContext(tp_rank=1, tp_size=2), ParallelContext(ep_rank=1, ep_size=2),
     ParallelContext(ep_rank=0, ep_size=2, tokens_replicated=False)],
    ids=["tp2-rank1", "ep2-rank1", "dp2-ep2-rank0"],
)
def test_every_rank_holds_the_whole_vision_tower(tiny_checkpoint, model, parallel):
    rank = load_model(tiny_checkpoint, "float32", parallel=parallel)
    full, held = held_vision_tensors(model), held_vision_tensors(rank)
    assert set(held) == set(full)
    assert all(torch.equal(held[n], full[n]) for n in full)
