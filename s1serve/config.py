"""Typed configs read from a checkpoint folder: config.json (model shapes) and generation_config.json.

The checkpoint is the one source of model facts; nothing here repeats the published numbers as literals.
Supported `model_type`s: `interns1_pro` (text_config + vision_config), `interns1_pro_text` (text only) and
`qwen3_moe` (the same decoder with plain RoPE and plain top-k routing, used to compare against transformers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s1serve.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("interns1_pro", "interns1_pro_text", "qwen3_moe")
FOPE_KEYS = ("fope_init_factor", "fope_sep_head", "num_inv_freq")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class _Fields:
    """Reads typed fields from one JSON object, naming file and key in every error."""

    def __init__(self, data: dict[str, Any], where: str):
        self.data = data
        self.where = where

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self.where}: missing field '{key}'")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{self.where}: field '{key}' must be {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.where}: field '{key}' must be {_kind_name(kind)}, got {value!r}")
        return value

    def int(self, key: str, default: Any = None, *, positive: bool = True) -> int:
        value = self._get(key, int, _REQUIRED if default is None else default)
        if positive and value <= 0:
            raise ConfigError(f"{self.where}: field '{key}' must be > 0, got {value}")
        return value

    def float(self, key: str, default: Any = None) -> float:
        return float(self._get(key, (int, float), _REQUIRED if default is None else default))

    def bool(self, key: str, default: bool) -> bool:
        return self._get(key, bool, default)

    def str(self, key: str, default: Any = None) -> str:
        return self._get(key, str, _REQUIRED if default is None else default)

    def optional(self, key: str, kind: type | tuple[type, ...]) -> Any:
        return self._get(key, kind, None)


_REQUIRED = object()


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


@dataclass(frozen=True)
class FoPEConfig:
    """Fourier position encoding settings (rope_scaling keys of the published config)."""

    sep_head: bool
    init_factor: float | None
    num_inv_freq: int | None


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    router_n_groups: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    fope: FoPEConfig | None
    hidden_act: str
    attention_bias: bool
    dtype: str
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    def is_moe_layer(self, layer: int) -> bool:
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    hidden_act: str


@dataclass(frozen=True)
class QuantConfig:
    """The FP8 `quantization_config` of the published checkpoint."""

    quant_method: str
    fmt: str
    scale_fmt: str | None
    weight_block_size: tuple[int, int]
    activation_scheme: str
    modules_to_not_convert: tuple[str, ...]


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    architectures: tuple[str, ...]
    text: TextConfig
    vision: VisionConfig | None
    tie_word_embeddings: bool
    quantization: QuantConfig | None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    @property
    def weight_prefix(self) -> str:
        """Name prefix of the text decoder's tensors in the checkpoint."""
        return "model." if self.model_type == "qwen3_moe" else "model.language_model."


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from generation_config.json; a request that sets nothing gets these."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None


def _parse_fope(rope_scaling: Any, where: str) -> FoPEConfig | None:
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"{where}: field 'rope_scaling' must be an object, got {rope_scaling!r}")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if not any(rope_scaling.get(k) is not None for k in FOPE_KEYS):
        if rope_type != "default":
            raise ConfigError(f"{where}: rope_scaling type '{rope_type}' is not supported (only 'default' / FoPE)")
        return None
    if rope_type != "default":
        raise ConfigError(f"{where}: FoPE needs rope_scaling.rope_type 'default', got '{rope_type}'")
    fields = _Fields(rope_scaling, f"{where} rope_scaling")
    num_inv_freq = fields.optional("num_inv_freq", int)
    if num_inv_freq is not None and num_inv_freq <= 0:
        raise ConfigError(f"{where}: rope_scaling.num_inv_freq must be > 0, got {num_inv_freq}")
    init = fields.optional("fope_init_factor", (int, float))
    return FoPEConfig(
        sep_head=fields.bool("fope_sep_head", False),
        init_factor=None if init is None else float(init),
        num_inv_freq=num_inv_freq,
    )


def _parse_text(data: dict[str, Any], where: str, *, grouped: bool) -> TextConfig:
    f = _Fields(data, where)
    hidden = f.int("hidden_size")
    heads = f.int("num_attention_heads")
    kv_heads = f.int("num_key_value_heads", heads)
    head_dim = f.int("head_dim", hidden // heads)
    num_experts = f.int("num_experts", 0, positive=False)
    top_k = f.int("num_experts_per_tok", 1)
    groups = f.int("router_n_groups", 1) if grouped else 1
    mlp_only = data.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise ConfigError(f"{where}: field 'mlp_only_layers' must be a list of layer indices")
    cfg = TextConfig(
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=f.int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=f.int("intermediate_size"),
        moe_intermediate_size=f.int("moe_intermediate_size", 1),
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        router_n_groups=groups,
        norm_topk_prob=f.bool("norm_topk_prob", True),
        decoder_sparse_step=f.int("decoder_sparse_step", 1),
        mlp_only_layers=tuple(mlp_only),
        rms_norm_eps=f.float("rms_norm_eps", 1e-6),
        rope_theta=f.float("rope_theta", 10000.0),
        max_position_embeddings=f.int("max_position_embeddings"),
        fope=_parse_fope(data.get("rope_scaling"), where),
        hidden_act=f.str("hidden_act", "silu"),
        attention_bias=f.bool("attention_bias", False),
        dtype=f.str("dtype", data.get("torch_dtype") or "bfloat16"),
        eos_token_id=data.get("eos_token_id") if isinstance(data.get("eos_token_id"), int) else None,
        bos_token_id=data.get("bos_token_id") if isinstance(data.get("bos_token_id"), int) else None,
    )
    _check_text(cfg, where)
    return cfg


def _check_text(cfg: TextConfig, where: str) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise bad(
            f"num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({cfg.num_key_value_heads})"
        )
    if cfg.head_dim % 2:
        raise bad(f"head_dim ({cfg.head_dim}) must be even for rotary position encoding")
    if cfg.hidden_act != "silu":
        raise bad(f"hidden_act '{cfg.hidden_act}' is not supported (only 'silu')")
    if cfg.attention_bias:
        raise bad("attention_bias true is not supported (the published model has none)")
    if cfg.num_experts:
        if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
            raise bad(f"num_experts_per_tok ({cfg.num_experts_per_tok}) must be in 1..num_experts ({cfg.num_experts})")
        if cfg.num_experts % cfg.router_n_groups:
            raise bad(f"num_experts ({cfg.num_experts}) must be a multiple of router_n_groups ({cfg.router_n_groups})")
        if cfg.num_experts_per_tok % cfg.router_n_groups:
            raise bad(
                f"num_experts_per_tok ({cfg.num_experts_per_tok}) must be a multiple of "
                f"router_n_groups ({cfg.router_n_groups})"
            )
    bad_layers = [i for i in cfg.mlp_only_layers if not 0 <= i < cfg.num_hidden_layers]
    if bad_layers:
        raise bad(f"mlp_only_layers {bad_layers} outside 0..{cfg.num_hidden_layers - 1}")
    if cfg.fope is not None and cfg.fope.num_inv_freq is not None and cfg.fope.num_inv_freq > cfg.head_dim // 2:
        raise bad(f"rope_scaling.num_inv_freq ({cfg.fope.num_inv_freq}) exceeds head_dim/2 ({cfg.head_dim // 2})")


def _parse_vision(data: dict[str, Any], where: str) -> VisionConfig:
    f = _Fields(data, where)
    cfg = VisionConfig(
        depth=f.int("depth"),
        hidden_size=f.int("hidden_size"),
        intermediate_size=f.int("intermediate_size"),
        num_heads=f.int("num_heads"),
        in_channels=f.int("in_channels", 3),
        patch_size=f.int("patch_size"),
        temporal_patch_size=f.int("temporal_patch_size", 2),
        spatial_merge_size=f.int("spatial_merge_size", 2),
        out_hidden_size=f.int("out_hidden_size"),
        num_position_embeddings=f.int("num_position_embeddings"),
        hidden_act=f.str("hidden_act", "gelu_pytorch_tanh"),
    )
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"{where}: hidden_size ({cfg.hidden_size}) must be a multiple of num_heads ({cfg.num_heads})")
    if cfg.hidden_act != "gelu_pytorch_tanh":
        raise ConfigError(f"{where}: hidden_act '{cfg.hidden_act}' is not supported (only 'gelu_pytorch_tanh')")
    if (cfg.hidden_size // cfg.num_heads) % 4:
        raise ConfigError(f"{where}: hidden_size / num_heads ({cfg.hidden_size // cfg.num_heads}) must be a multiple "
                          "of 4 for the 2-D rotary encoding")
    side = math.isqrt(cfg.num_position_embeddings)
    if side * side != cfg.num_position_embeddings:
        raise ConfigError(f"{where}: num_position_embeddings ({cfg.num_position_embeddings}) must be a square")
    return cfg


SUPPORTED_QUANT = "quant_method 'fp8' with fmt 'e4m3', weight_block_size [128, 128], activation_scheme 'dynamic'"


def _parse_quant(data: Any, where: str) -> QuantConfig | None:
    """The FP8 block format of the published checkpoint, and nothing else (awq, gptq, e5m2, mxfp4... are refused)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: field 'quantization_config' must be an object")
    f = _Fields(data, f"{where} quantization_config")

    def unsupported(field: str, value: Any) -> ConfigError:
        return ConfigError(f"{where}: quantization_config.{field} {value!r} is not supported (supported: {SUPPORTED_QUANT})")

    method = f.str("quant_method")
    if method != "fp8":
        raise unsupported("quant_method", method)
    fmt = f.str("fmt", "e4m3")
    if fmt != "e4m3":
        raise unsupported("fmt", fmt)
    block = data.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"{where}: quantization_config.weight_block_size must be two positive ints, got {block!r}")
    if block != [128, 128]:
        raise unsupported("weight_block_size", block)
    activation = f.str("activation_scheme", "dynamic")
    if activation != "dynamic":
        raise unsupported("activation_scheme", activation)
    scale_fmt = f.optional("scale_fmt", str)
    if scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"{where}: quantization_config.scale_fmt {scale_fmt!r} is not supported (supported: 'ue8m0' or none)")
    skip = data.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ConfigError(f"{where}: quantization_config.modules_to_not_convert must be a list of names")
    return QuantConfig(
        quant_method=method,
        fmt=fmt,
        scale_fmt=scale_fmt,
        weight_block_size=(block[0], block[1]),
        activation_scheme=activation,
        modules_to_not_convert=tuple(skip),
    )


def parse_model_config(data: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from the parsed JSON of a checkpoint's config.json."""
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    vision = None
    if model_type == "interns1_pro":
        text_data = data.get("text_config")
        if not isinstance(text_data, dict):
            raise ConfigError(f"{where}: model_type 'interns1_pro' needs a 'text_config' object")
        text = _parse_text(text_data, f"{where} text_config", grouped=True)
        if isinstance(data.get("vision_config"), dict):
            vision = _parse_vision(data["vision_config"], f"{where} vision_config")
            if vision.out_hidden_size != text.hidden_size:
                raise ConfigError(
                    f"{where}: vision_config.out_hidden_size ({vision.out_hidden_size}) must equal "
                    f"text_config.hidden_size ({text.hidden_size})"
                )
    else:
        text = _parse_text(data, where, grouped=model_type == "interns1_pro_text")
    if model_type == "qwen3_moe" and text.fope is not None:
        raise ConfigError(f"{where}: qwen3_moe does not use FoPE rope_scaling keys")
    tie = data.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"{where}: field 'tie_word_embeddings' must be bool, got {tie!r}")
    archs = data.get("architectures") or []
    return ModelConfig(
        model_type=model_type,
        architectures=tuple(archs),
        text=text,
        vision=vision,
        tie_word_embeddings=tie,
        quantization=_parse_quant(data.get("quantization_config"), where),
        image_token_id=data.get("image_token_id"),
        video_token_id=data.get("video_token_id"),
        vision_start_token_id=data.get("vision_start_token_id"),
        vision_end_token_id=data.get("vision_end_token_id"),
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Reads `<model_dir>/config.json`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: not a folder")
    path = model_dir / "config.json"
    return parse_model_config(_read_json(path), str(path))


def load_generation_defaults(model_dir: str | Path) -> GenerationDefaults:
    """Reads `<model_dir>/generation_config.json`; a checkpoint without one gets neutral defaults."""
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return GenerationDefaults()
    data = _read_json(path)
    f = _Fields(data, str(path))
    eos_ids = _eos_token_ids(data, path)
    do_sample = f.bool("do_sample", True)
    return GenerationDefaults(
        temperature=f.float("temperature", 1.0) if do_sample else 0.0,
        top_p=f.float("top_p", 1.0),
        top_k=f.int("top_k", 0, positive=False),
        min_p=f.float("min_p", 0.0),
        repetition_penalty=f.float("repetition_penalty", 1.0),
        eos_token_ids=eos_ids,
        bos_token_id=f.optional("bos_token_id", int),
        pad_token_id=f.optional("pad_token_id", int),
    )


def read_eos_token_ids(model_dir: str | Path) -> tuple[int, ...]:
    """The end-of-sequence ids of `<model_dir>/generation_config.json` (none without the file)."""
    path = Path(model_dir) / "generation_config.json"
    return _eos_token_ids(_read_json(path), path) if path.exists() else ()


def _eos_token_ids(data: dict[str, Any], path: Path) -> tuple[int, ...]:
    eos = data.get("eos_token_id")
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
    if not all(isinstance(i, int) for i in eos_ids):
        raise ConfigError(f"{path}: field 'eos_token_id' must be an int or a list of ints, got {eos!r}")
    return eos_ids
