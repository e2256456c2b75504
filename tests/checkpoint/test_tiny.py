import hashlib
import json

import pytest
from safetensors import safe_open

from s1serve.assets import CHECKPOINT_SIDE_FILES
from s1serve.checkpoint.fope import fope_frequencies
from s1serve.checkpoint.tiny import write_tiny_checkpoint
from s1serve.config import load_model_config


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_matches_the_published_checkpoint(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    names = set(index["weight_map"])
    for name in (
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.1.self_attn.q_norm.weight",
        "model.language_model.layers.1.mlp.gate.weight",
        "model.language_model.layers.1.mlp.experts.15.down_proj.weight",
        "model.language_model.rotary_emb.sin_coef",
        "model.language_model.rotary_emb.cos_coef",
        "model.language_model.norm.weight",
        "lm_head.weight",
        "model.visual.patch_embed.proj.weight",
        "model.visual.merger.linear_fc2.weight",
    ):
        assert name in names, name
    for side in CHECKPOINT_SIDE_FILES:
        assert (tiny_checkpoint / side).is_file(), side

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["InternS1ProForConditionalGeneration"] and config["model_type"] == "interns1_pro"
    text = config["text_config"]
    assert text["vocab_size"] == 155008 and text["router_n_groups"] > 1
    assert set(text["rope_scaling"]) >= {"fope_init_factor", "fope_sep_head"}

    cfg = load_model_config(tiny_checkpoint)
    kept = fope_frequencies(cfg.text).numel()
    assert 0 < kept < cfg.text.head_dim // 2, "tiny must exercise FoPE's frequency selection and padding"
    shard = index["weight_map"]["model.language_model.rotary_emb.sin_coef"]
    with safe_open(str(tiny_checkpoint / shard), "pt") as f:
        assert tuple(f.get_slice("model.language_model.rotary_emb.sin_coef").get_shape()) == (cfg.text.num_key_value_heads, kept, kept)


def test_deterministic_from_seed(tmp_path, tiny_checkpoint):
    again = write_tiny_checkpoint(tmp_path / "again", "tiny", seed=0)
    other = write_tiny_checkpoint(tmp_path / "other", "tiny", seed=1)
    assert _digest(again) == _digest(tiny_checkpoint)
    assert _digest(other) != _digest(tiny_checkpoint)


def test_qwen3_moe_arch_has_flat_names(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "q", "tiny", seed=0, arch="qwen3_moe")
    cfg = load_model_config(out)
    assert cfg.model_type == "qwen3_moe" and cfg.text.fope is None and cfg.text.router_n_groups == 1
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in names and not any("rotary_emb" in n for n in names)


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        write_tiny_checkpoint(tmp_path, "huge")
