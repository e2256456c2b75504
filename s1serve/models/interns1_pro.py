"""The Intern-S1-Pro text decoder (also serves qwen3_moe: the same decoder with plain RoPE and top-k routing).

Per layer: x += Attn(RMSNorm(x)); x += MoE(RMSNorm(x)); then a final RMSNorm and an untied lm_head. The forward
takes a flat batch of tokens from many sequences with their positions and the paged KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from s1serve.config import ModelConfig, TextConfig
from s1serve.layers.attention import Attention, AttentionBatch, KVCache
from s1serve.layers.moe import DenseMLP, SparseMoE
from s1serve.layers.norm import RMSNorm
from s1serve.layers.rotary import build_position_encoding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if cfg.is_moe_layer(index) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, batch: AttentionBatch
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class InternS1ProForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.text
        self.config = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = build_position_encoding(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for param in self.parameters():
            param.requires_grad_(False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[KVCache], batch: AttentionBatch
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        cos, sin = self.rotary_emb(positions)
        x = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, cache, batch)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def checkpoint_targets(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the parameter (or view of one) that receives it."""
        prefix = self.config.weight_prefix
        targets: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            if name.startswith("lm_head."):
                targets[name] = param
            elif not name.endswith((".w13", ".w2")):
                targets[prefix + name] = param
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoE):
                moe, inter = layer.mlp, layer.mlp.intermediate
                for j in range(moe.num_experts):
                    ep = f"{prefix}layers.{i}.mlp.experts.{j}."
                    targets[ep + "gate_proj.weight"] = moe.w13[j, :inter]
                    targets[ep + "up_proj.weight"] = moe.w13[j, inter:]
                    targets[ep + "down_proj.weight"] = moe.w2[j]
        return targets
