"""`s1serve make-tiny`: random checkpoints in the published layout, for tests and benchmarks.

The config starts from the published config.json (architectures, model_type, rope_scaling, router_n_groups,
token ids) with small dims substituted; tensors carry the published names and are sharded like the published
checkpoint. Every tensor is drawn from a generator seeded by (seed, tensor name), so the output is deterministic
whatever the shard plan, and scaled so that routing and attention are far from uniform. With fp8 the quantisable
tensors are quantised as they are drawn, exactly as `s1serve quantize` would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from s1serve.assets import ASSETS_DIR, CHECKPOINT_SIDE_FILES
from s1serve.checkpoint.fope import fope_coef_shape
from s1serve.checkpoint.quantize import fp8_unit, quantization_config
from s1serve.checkpoint.stream import TensorInfo, Unit, write_sharded
from s1serve.config import ModelConfig, parse_model_config

PRESETS: dict[str, dict[str, Any]] = {
    # Keeps CI fast: a few MB of decoder weights, plus the real-vocab embedding and lm_head.
    "tiny": dict(
        text=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            intermediate_size=128, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
            router_n_groups=2,
        ),
        # Two blocks, so that golden features also check how blocks chain; a 8x8 position table, so that real
        # image grids interpolate it.
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64),
        shard_bytes=24 << 20,
    ),
    # What benchmarks use: the published proportions at 1/4 width.
    "bench": dict(
        text=dict(
            hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
            intermediate_size=3072, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8,
            router_n_groups=8,
        ),
        vision=dict(depth=2, hidden_size=256, intermediate_size=1024, num_heads=4, num_position_embeddings=256),
        shard_bytes=512 << 20,
    ),
    # FP8 tests: dims above 128 and not multiples of it where the format allows (hidden 320 gives partial edge
    # blocks), while every tp=2 split of q/k/v/o and the experts stays on 128 boundaries.
    "edge": dict(
        text=dict(
            hidden_size=320, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
            intermediate_size=512, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=4,
            router_n_groups=2,
        ),
        vision=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64),
        shard_bytes=128 << 20,
    ),
}
ARCHS = ("interns1_pro", "qwen3_moe")
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal:<std>", "norm" (around 1), "fope" (identity plus noise)

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.name, DTYPE, self.shape)


def tiny_config(preset: str, arch: str = "interns1_pro") -> dict[str, Any]:
    """config.json of a tiny checkpoint: the published one with the preset's dims."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (expected one of {', '.join(PRESETS)})")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (expected one of {', '.join(ARCHS)})")
    published = json.loads((ASSETS_DIR / "config.json").read_text())
    dims = PRESETS[preset]
    text = copy.deepcopy(published["text_config"])
    text.update(dims["text"], dtype="bfloat16")
    if arch == "qwen3_moe":
        for key in ("rope_scaling", "router_n_groups"):
            text.pop(key)
        text.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], tie_word_embeddings=False)
        return text
    config = {k: v for k, v in published.items() if k != "quantization_config"}
    config["text_config"] = text
    config["vision_config"] = {**published["vision_config"], **dims["vision"], "out_hidden_size": text["hidden_size"]}
    return config


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of a checkpoint with this config, in the published naming."""
    t = cfg.text
    p = cfg.weight_prefix
    h, d = t.hidden_size, t.head_dim

    def linear(name: str, out_dim: int, in_dim: int, gain: float = 1.0) -> TensorSpec:
        return TensorSpec(name, (out_dim, in_dim), f"normal:{gain / math.sqrt(in_dim)}")

    specs = [TensorSpec(f"{p}embed_tokens.weight", (t.vocab_size, h), "normal:1.0")]
    for i in range(t.num_hidden_layers):
        lp = f"{p}layers.{i}."
        specs += [
            TensorSpec(f"{lp}input_layernorm.weight", (h,), "norm"),
            TensorSpec(f"{lp}post_attention_layernorm.weight", (h,), "norm"),
            linear(f"{lp}self_attn.q_proj.weight", t.num_attention_heads * d, h),
            linear(f"{lp}self_attn.k_proj.weight", t.num_key_value_heads * d, h),
            linear(f"{lp}self_attn.v_proj.weight", t.num_key_value_heads * d, h),
            linear(f"{lp}self_attn.o_proj.weight", h, t.num_attention_heads * d),
            TensorSpec(f"{lp}self_attn.q_norm.weight", (d,), "norm"),
            TensorSpec(f"{lp}self_attn.k_norm.weight", (d,), "norm"),
        ]
        if t.is_moe_layer(i):
            # A wide router makes softmax peaked enough that top-k choices are well separated.
            specs.append(linear(f"{lp}mlp.gate.weight", t.num_experts, h, gain=3.0))
            for j in range(t.num_experts):
                ep = f"{lp}mlp.experts.{j}."
                specs += [
                    linear(f"{ep}gate_proj.weight", t.moe_intermediate_size, h),
                    linear(f"{ep}up_proj.weight", t.moe_intermediate_size, h),
                    linear(f"{ep}down_proj.weight", h, t.moe_intermediate_size),
                ]
        else:
            specs += [
                linear(f"{lp}mlp.gate_proj.weight", t.intermediate_size, h),
                linear(f"{lp}mlp.up_proj.weight", t.intermediate_size, h),
                linear(f"{lp}mlp.down_proj.weight", h, t.intermediate_size),
            ]
    specs.append(TensorSpec(f"{p}norm.weight", (h,), "norm"))
    if t.fope is not None:
        shape = fope_coef_shape(t)
        specs += [TensorSpec(f"{p}rotary_emb.{k}_coef", shape, "fope") for k in ("sin", "cos")]
    specs.append(linear("lm_head.weight", t.vocab_size, h, gain=2.0))
    if cfg.vision is not None:
        specs += _vision_specs(cfg)
    return specs


def _vision_specs(cfg: ModelConfig) -> list[TensorSpec]:
    v = cfg.vision
    hv, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size**2

    def affine(name: str, out_dim: int, in_dim: int) -> list[TensorSpec]:
        return [
            TensorSpec(f"{name}.weight", (out_dim, in_dim), f"normal:{1 / math.sqrt(in_dim)}"),
            TensorSpec(f"{name}.bias", (out_dim,), "normal:0.02"),
        ]

    def layer_norm(name: str, dim: int) -> list[TensorSpec]:
        return [TensorSpec(f"{name}.weight", (dim,), "norm"), TensorSpec(f"{name}.bias", (dim,), "normal:0.02")]

    vp = "model.visual."
    specs = [
        TensorSpec(
            f"{vp}patch_embed.proj.weight",
            (hv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
            f"normal:{1 / math.sqrt(patch_in)}",
        ),
        TensorSpec(f"{vp}patch_embed.proj.bias", (hv,), "normal:0.02"),
        TensorSpec(f"{vp}pos_embed.weight", (v.num_position_embeddings, hv), "normal:0.5"),
    ]
    for b in range(v.depth):
        bp = f"{vp}blocks.{b}."
        specs += layer_norm(f"{bp}norm1", hv) + layer_norm(f"{bp}norm2", hv)
        specs += affine(f"{bp}attn.qkv", 3 * hv, hv) + affine(f"{bp}attn.proj", hv, hv)
        specs += affine(f"{bp}mlp.linear_fc1", v.intermediate_size, hv)
        specs += affine(f"{bp}mlp.linear_fc2", hv, v.intermediate_size)
    specs += layer_norm(f"{vp}merger.norm", hv)
    specs += affine(f"{vp}merger.linear_fc1", merged, merged) + affine(f"{vp}merger.linear_fc2", v.out_hidden_size, merged)
    return specs


def draw(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The tensor for one spec, from a generator seeded by (seed, name)."""
    digest = hashlib.sha256(f"{seed}:{spec.name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    kind, _, arg = spec.init.partition(":")
    if kind == "normal":
        out = torch.randn(spec.shape, generator=gen) * float(arg)
    elif kind == "norm":
        out = 1.0 + 0.2 * torch.randn(spec.shape, generator=gen)
    elif kind == "fope":
        kept = spec.shape[-1]
        out = torch.randn(spec.shape, generator=gen) * (0.5 / math.sqrt(kept)) + torch.eye(kept)
    else:
        raise ValueError(f"unknown init {spec.init!r}")
    return out.to(DTYPE)


def write_tiny_checkpoint(
    out: str | Path, preset: str = "tiny", seed: int = 0, arch: str = "interns1_pro", fp8: bool = False
) -> Path:
    """Writes a complete checkpoint folder (weights, index, config, tokenizer, template) and returns its path; with
    fp8, in the published FP8 layout."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(preset, arch)
    specs = tensor_specs(parse_model_config(config, f"{preset} preset"))
    units = [_unit(spec, seed, fp8) for spec in specs]
    write_sharded(out, units, PRESETS[preset]["shard_bytes"])
    if fp8:
        config["quantization_config"] = quantization_config(spec.info for spec in specs)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in CHECKPOINT_SIDE_FILES:
        shutil.copyfile(ASSETS_DIR / name, out / name)
    return out


def _unit(spec: TensorSpec, seed: int, fp8: bool) -> Unit:
    if fp8:
        return fp8_unit(spec.info, lambda: draw(spec, seed), "make-tiny")
    return Unit((spec.info,), lambda: (draw(spec, seed),))
