"""A deliberately naive float32 Intern-S1-Pro text decoder: the spec (shared/docs/interns1_pro.md) in code.

Test-only and independent of s1serve.models / s1serve.layers: it reads a checkpoint folder with json and
safetensors and nothing else. Everything is written the slow, obvious way so that it can be checked line by
line against the spec:

- one Python loop over positions for every per-token step (norms, projections, position encoding, router,
  experts); attention for position t is a softmax over the keys of positions 0..t computed from scratch;
  no KV cache, no batching tricks;
- a dense loop over *all* experts for every token, each weighted by its routing weight (0 when not chosen);
- FoPE evaluated from its formula for each position: float32 inverse frequencies, frequency selection,
  sin/cos mixed through the checkpoint's coefficient matrices, padded with 1.0, query head j using the table of
  KV head j // (num_heads / num_kv_heads).

It also covers the checkpoint variants s1serve reads: `interns1_pro` (text_config nested, weights under
`model.language_model.`), `interns1_pro_text` and `qwen3_moe` (flat config, weights under `model.`, plain
RoPE, plain top-k routing), and dense-MLP layers (`mlp_only_layers`, `decoder_sparse_step`).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

FOPE_KEYS = ("fope_init_factor", "fope_sep_head", "num_inv_freq")


@dataclass(frozen=True)
class NaiveModel:
    cfg: dict  # the text config
    weights: dict[str, torch.Tensor]  # float32, keyed by the name with the decoder prefix removed
    fope: bool
    sep_head: bool


# ----------------------------------------------------------------------------------------------- loading


def _text_config(config: dict) -> tuple[dict, str]:
    """(text config, weight-name prefix of the decoder) for the supported model types."""
    if config.get("model_type") == "interns1_pro":
        return config["text_config"], "model.language_model."
    return config, "model."


@functools.lru_cache(maxsize=4)
def load_naive_model(model_dir: str | Path) -> NaiveModel:
    model_dir = Path(model_dir)
    cfg, prefix = _text_config(json.loads((model_dir / "config.json").read_text()))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(model_dir / shard), framework="pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    weights[name[len(prefix):]] = f.get_tensor(name).to(torch.float32)
                elif name == "lm_head.weight":
                    weights[name] = f.get_tensor(name).to(torch.float32)
    scaling = cfg.get("rope_scaling") or {}
    fope = any(scaling.get(key) is not None for key in FOPE_KEYS)
    return NaiveModel(cfg=cfg, weights=weights, fope=fope, sep_head=bool(scaling.get("fope_sep_head")))


# ------------------------------------------------------------------------------------------- the pieces


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., n]; normalised over the last axis."""
    return weight * (x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[half:], x[:half]])


def inverse_frequencies(cfg: dict) -> torch.Tensor:
    """theta^(-2i/head_dim), i = 0..head_dim/2-1, computed in float32."""
    head_dim = cfg["head_dim"]
    exponent = torch.tensor([2 * i for i in range(head_dim // 2)], dtype=torch.float32) / head_dim
    return 1.0 / (torch.tensor(float(cfg["rope_theta"]), dtype=torch.float32) ** exponent)


def kept_frequencies(cfg: dict) -> torch.Tensor:
    """FoPE keeps the first num_inv_freq frequencies, else those whose period fits in max positions."""
    inv_freq = inverse_frequencies(cfg)
    num = (cfg.get("rope_scaling") or {}).get("num_inv_freq")
    if num is not None:
        return inv_freq[:num]
    threshold = 2.0 * math.pi / cfg["max_position_embeddings"]
    return torch.stack([f for f in inv_freq if float(f) > threshold])


def cos_sin(model: NaiveModel, position: int, kv_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The [head_dim] cos and sin tables for one position and one KV head."""
    cfg = model.cfg
    half = cfg["head_dim"] // 2
    if not model.fope:
        angles = position * inverse_frequencies(cfg)
        c, s = torch.cos(angles), torch.sin(angles)
    else:
        angles = position * kept_frequencies(cfg)  # [F]
        sin_coef = model.weights["rotary_emb.sin_coef"]
        cos_coef = model.weights["rotary_emb.cos_coef"]
        if model.sep_head:
            sin_coef, cos_coef = sin_coef[kv_head], cos_coef[kv_head]
        s = torch.sin(angles) @ sin_coef  # [F]
        c = torch.cos(angles) @ cos_coef
        pad = torch.ones(half - s.shape[0])  # unkept frequencies: 1.0, not 0
        s, c = torch.cat([s, pad]), torch.cat([c, pad])
    return torch.cat([c, c]), torch.cat([s, s])


def apply_position(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def routing_weights(model: NaiveModel, layer: str, x: torch.Tensor) -> list[float]:
    """One weight per expert for one token: renormalised top-k (per group) softmax probabilities, else 0."""
    cfg = model.cfg
    num_experts, top_k = cfg["num_experts"], cfg["num_experts_per_tok"]
    groups = cfg.get("router_n_groups") or 1
    probs = torch.softmax(model.weights[f"{layer}mlp.gate.weight"] @ x, dim=-1)
    chosen: list[int] = []
    if groups > 1:
        size, per_group = num_experts // groups, top_k // groups
        for g in range(groups):
            members = list(range(g * size, (g + 1) * size))
            members.sort(key=lambda e: -float(probs[e]))  # stable: ties go to the lower index
            chosen += members[:per_group]
    else:
        order = sorted(range(num_experts), key=lambda e: -float(probs[e]))
        chosen = order[:top_k]
    weights = [0.0] * num_experts
    total = sum(float(probs[e]) for e in chosen)
    for e in chosen:
        weights[e] = float(probs[e]) / total if cfg.get("norm_topk_prob", True) else float(probs[e])
    return weights


def ffn(model: NaiveModel, prefix: str, x: torch.Tensor) -> torch.Tensor:
    w = model.weights
    return w[f"{prefix}down_proj.weight"] @ (silu(w[f"{prefix}gate_proj.weight"] @ x) * (w[f"{prefix}up_proj.weight"] @ x))


def is_moe_layer(cfg: dict, i: int) -> bool:
    return (
        i not in (cfg.get("mlp_only_layers") or [])
        and cfg.get("num_experts", 0) > 0
        and (i + 1) % cfg.get("decoder_sparse_step", 1) == 0
    )


# -------------------------------------------------------------------------------------------- the model


def attention(model: NaiveModel, layer: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Causal GQA attention over the normed hidden states of all positions, one query position at a time."""
    cfg, w = model.cfg, model.weights
    d, n_heads, n_kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    group = n_heads // n_kv
    eps = cfg["rms_norm_eps"]
    keys, values, queries = [], [], []
    for t, x in enumerate(xs):
        q = (w[f"{layer}self_attn.q_proj.weight"] @ x).view(n_heads, d)
        k = (w[f"{layer}self_attn.k_proj.weight"] @ x).view(n_kv, d)
        v = (w[f"{layer}self_attn.v_proj.weight"] @ x).view(n_kv, d)
        tables = [cos_sin(model, t, h) for h in range(n_kv)]
        q = torch.stack([
            apply_position(rms_norm(q[j], w[f"{layer}self_attn.q_norm.weight"], eps), *tables[j // group])
            for j in range(n_heads)
        ])
        k = torch.stack([
            apply_position(rms_norm(k[h], w[f"{layer}self_attn.k_norm.weight"], eps), *tables[h])
            for h in range(n_kv)
        ])
        queries.append(q)
        keys.append(k)
        values.append(v)
    keys_of = [torch.stack([k[h] for k in keys]) for h in range(n_kv)]  # per KV head: [T, d]
    values_of = [torch.stack([v[h] for v in values]) for h in range(n_kv)]
    outputs = []
    for t in range(len(xs)):
        heads = []
        for j in range(n_heads):
            h = j // group
            past_k, past_v = keys_of[h][: t + 1], values_of[h][: t + 1]  # positions 0..t only: causal
            scores = (past_k @ queries[t][j]) * d**-0.5
            heads.append(torch.softmax(scores, dim=0) @ past_v)
        outputs.append(w[f"{layer}self_attn.o_proj.weight"] @ torch.cat(heads))
    return outputs


def moe(model: NaiveModel, layer: str, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e, weight in enumerate(routing_weights(model, layer, x)):
        out = out + weight * ffn(model, f"{layer}mlp.experts.{e}.", x)  # dense: every expert, weight 0 if unchosen
    return out


@functools.lru_cache(maxsize=16)
def _final_hidden(model_dir: str, token_ids: tuple[int, ...]) -> torch.Tensor:
    model = load_naive_model(model_dir)
    cfg, w = model.cfg, model.weights
    eps = cfg["rms_norm_eps"]
    hs = [w["embed_tokens.weight"][i].clone() for i in token_ids]
    for i in range(cfg["num_hidden_layers"]):
        layer = f"layers.{i}."
        normed = [rms_norm(h, w[f"{layer}input_layernorm.weight"], eps) for h in hs]
        hs = [h + a for h, a in zip(hs, attention(model, layer, normed))]
        new = []
        for h in hs:
            x = rms_norm(h, w[f"{layer}post_attention_layernorm.weight"], eps)
            new.append(h + (moe(model, layer, x) if is_moe_layer(cfg, i) else ffn(model, f"{layer}mlp.", x)))
        hs = new
    return torch.stack([rms_norm(h, w["norm.weight"], eps) for h in hs])


@torch.no_grad()
def naive_logits(model_dir: str | Path, token_ids: list[int], positions: list[int] | None = None) -> torch.Tensor:
    """float32 logits [len(positions), vocab] (all positions by default) of one full pass over token_ids."""
    token_ids = tuple(int(t) for t in token_ids)
    if not token_ids:
        raise ValueError("token_ids is empty")
    hidden = _final_hidden(str(Path(model_dir).resolve()), token_ids)
    if positions is not None:
        hidden = hidden[list(positions)]
    lm_head = load_naive_model(str(Path(model_dir).resolve())).weights["lm_head.weight"]
    return torch.stack([lm_head @ h for h in hidden])


def naive_greedy(model_dir: str | Path, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by full recomputation of the whole sequence at every step."""
    ids = list(token_ids)
    for _ in range(max_new_tokens):
        ids.append(int(naive_logits(model_dir, ids, positions=[len(ids) - 1])[0].argmax()))
    return ids[len(token_ids):]
