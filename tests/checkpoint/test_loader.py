import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from s1serve.config import load_model_config
from s1serve.errors import CheckpointError
from s1serve.layers.moe import select_experts
from s1serve.models.registry import build_model, load_model

EXPERT = "model.language_model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def _shard_of(folder, name):
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def _rewrite_shard(folder, name, change):
    path = _shard_of(folder, name)
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_every_parameter_element_is_loaded(tiny_checkpoint):
    cfg = load_model_config(tiny_checkpoint)
    model = build_model(cfg, "float32")
    for p in model.parameters():
        p.fill_(float("nan"))
    from s1serve.checkpoint.loader import CheckpointReader, load_into

    load_into(model.checkpoint_targets(), CheckpointReader(tiny_checkpoint))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} was not (fully) loaded"


def test_routing_is_not_degenerate(tiny_checkpoint):
    model = load_model(tiny_checkpoint, "float32")
    x = model.embed_tokens(torch.arange(1000, 1400))
    layer = model.layers[0]
    moe = layer.mlp
    ids, weights = select_experts(moe.gate(layer.post_attention_layernorm(x)), moe.top_k, moe.num_groups, True)
    counts = torch.bincount(ids.flatten(), minlength=moe.num_experts)
    assert (counts > 0).all(), "every expert should receive tokens"
    assert weights.max(dim=-1).values.mean() > 1.5 / moe.top_k, "router weights should not be uniform"
    group = moe.num_experts // moe.num_groups
    assert ((ids // group).sort(dim=-1).values == torch.arange(moe.num_groups).repeat_interleave(moe.top_k // moe.num_groups)).all()


def test_missing_expert_tensor_is_named(ckpt_copy):
    _rewrite_shard(ckpt_copy, EXPERT, lambda t: t.pop(EXPERT))
    with pytest.raises(CheckpointError, match=f"index lists '{EXPERT}' but the shard lacks it"):
        load_model(ckpt_copy)
    index_path = ckpt_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][EXPERT]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor '{EXPERT}'"):
        load_model(ckpt_copy)


def test_wrong_shape_is_named(ckpt_copy):
    _rewrite_shard(ckpt_copy, EXPERT, lambda t: t.update({EXPERT: t[EXPERT][:-1].clone()}))
    with pytest.raises(CheckpointError, match=rf"tensor '{EXPERT}' has shape \[31, 64\], expected \[32, 64\]"):
        load_model(ckpt_copy)


def test_truncated_shard_is_named(ckpt_copy):
    path = _shard_of(ckpt_copy, EXPERT)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{path.name}: unreadable safetensors file"):
        load_model(ckpt_copy)


def test_missing_shard_and_missing_weights(ckpt_copy):
    path = _shard_of(ckpt_copy, EXPERT)
    path.unlink()
    with pytest.raises(CheckpointError, match=rf"{path.name}: shard listed in model.safetensors.index.json is missing"):
        load_model(ckpt_copy)
    for p in ckpt_copy.glob("model*"):
        p.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        load_model(ckpt_copy)


def test_unknown_tensor_is_refused(ckpt_copy):
    _rewrite_shard(ckpt_copy, EXPERT, lambda t: t.update({"model.language_model.layers.0.extra.weight": torch.zeros(2)}))
    index_path = ckpt_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.language_model.layers.0.extra.weight"] = _shard_of(ckpt_copy, EXPERT).name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.language_model.layers.0.extra.weight'"):
        load_model(ckpt_copy)


def test_bfloat16_load_keeps_fope_coefficients_in_float32(tiny_checkpoint):
    model = load_model(tiny_checkpoint, "bfloat16")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rotary_emb.sin_coef.dtype == torch.float32
    assert model.rotary_emb._inv_freq.dtype == torch.float32
