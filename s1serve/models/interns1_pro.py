"""The Intern-S1-Pro text decoder (also serves qwen3_moe: the same decoder with plain RoPE and top-k routing).

Per layer: x += Attn(RMSNorm(x)); x += MoE(RMSNorm(x)); then a final RMSNorm and an untied lm_head. The forward
takes a flat batch of tokens from many sequences with their positions and the paged KV cache.

Built with a ParallelContext, the model holds only this rank's shard: attention heads, the vocabulary and (without
EP) each expert's intermediate dimension split over tp; experts partitioned over ep; norms, router and (without
sep_head) the FoPE coefficients replicated. `checkpoint_targets` says which slice of which checkpoint tensor
each parameter receives, so loading reads only that slice. Under DP attention with EP every rank calls either
`forward` (with its tokens) or `idle_step` (without) in each step, since MoE layers exchange tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from s1serve.checkpoint.loader import Target
from s1serve.config import ModelConfig, TextConfig
from s1serve.distributed.context import ParallelContext
from s1serve.layers.attention import Attention, AttentionBatch, KVCache, kv_head_range
from s1serve.layers.linear import ParallelLMHead, ShardedWeight, VocabParallelEmbedding
from s1serve.layers.moe import DenseMLP, SparseMoE, exchange_token_counts
from s1serve.layers.norm import RMSNorm
from s1serve.layers.rotary import FourierEmbedding, build_position_encoding, fope_coef_shape


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int, ctx: ParallelContext):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ctx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.mlp = SparseMoE(cfg, ctx) if self.is_moe else DenseMLP(cfg.hidden_size, cfg.intermediate_size, ctx)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        batch: AttentionBatch,
        token_counts: list[int] | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, batch)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, token_counts) if self.is_moe else self.mlp(h))


class InternS1ProForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext = ParallelContext.single()):
        super().__init__()
        cfg = config.text
        self.config = config
        self.parallel = parallel
        kv_heads = kv_head_range(cfg, parallel)
        self.num_local_kv_heads = len(kv_heads)  # the KV heads this rank's cache holds
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)
        self.rotary_emb = build_position_encoding(cfg, kv_heads)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, parallel) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, parallel)
        for param in self.parameters():
            param.requires_grad_(False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[KVCache], batch: AttentionBatch
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns the final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos, sin = (table.to(x.dtype) for table in self.rotary_emb(positions))  # once, not in every layer
        token_counts = exchange_token_counts(x.shape[0], self.parallel, x.device)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, cache, batch, token_counts)
        return self.norm(x)

    @torch.inference_mode()
    def idle_step(self) -> None:
        """One step without tokens of this rank's own: under DP attention with EP, joins every MoE layer's token
        exchange (computing this rank's experts for the others' tokens) so that they do not wait forever. No
        attention, no cache. A no-op where ranks do not exchange tokens."""
        weight = self.lm_head.weight
        token_counts = exchange_token_counts(0, self.parallel, weight.device)
        if not token_counts or not any(token_counts):
            return
        x = weight.new_empty(0, self.config.text.hidden_size)
        for layer in self.layers:
            if layer.is_moe:
                layer.mlp(x, token_counts)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [T, vocab] (all of the vocabulary on every rank)."""
        return self.lm_head.compute_logits(hidden)

    def checkpoint_targets(self) -> dict[str, Target]:
        """Checkpoint tensor name -> where this rank puts it and which slice of it that is (the tensors this rank
        needs; experts of other EP ranks are in checkpoint_names_elsewhere)."""
        cfg = self.config.text
        prefix = self.config.weight_prefix
        sharded = {f"{name}.weight": m for name, m in self.named_modules() if isinstance(m, ShardedWeight)}
        fope_rows = isinstance(self.rotary_emb, FourierEmbedding) and self.rotary_emb.sep_head
        targets: dict[str, Target] = {}
        for name, param in self.named_parameters():
            if name.endswith((".w13", ".w2")):
                continue
            checkpoint_name = name if name.startswith("lm_head.") else prefix + name
            if name in sharded:
                m = sharded[name]
                targets[checkpoint_name] = Target.part(param, m.full_shape, m.split_dim, m.part)
            elif fope_rows and name.startswith("rotary_emb."):
                targets[checkpoint_name] = Target.part(param, fope_coef_shape(cfg), 0, self.rotary_emb.kv_heads)
            else:
                targets[checkpoint_name] = Target.whole(param)
        for i, layer in enumerate(self.layers):
            if layer.is_moe:
                moe, inter, part = layer.mlp, layer.mlp.intermediate, layer.mlp.intermediate_part
                up = (cfg.moe_intermediate_size, cfg.hidden_size)  # gate_proj and up_proj; down_proj transposed
                for local, j in enumerate(moe.experts):
                    ep = f"{prefix}layers.{i}.mlp.experts.{j}."
                    targets[ep + "gate_proj.weight"] = Target.part(moe.w13[local, :inter], up, 0, part)
                    targets[ep + "up_proj.weight"] = Target.part(moe.w13[local, inter:], up, 0, part)
                    targets[ep + "down_proj.weight"] = Target.part(moe.w2[local], up[::-1], 1, part)
        return targets

    def checkpoint_names_elsewhere(self) -> set[str]:
        """Checkpoint tensors that other EP ranks load (their experts): this rank neither reads nor refuses them."""
        prefix = self.config.weight_prefix
        return {
            f"{prefix}layers.{i}.mlp.experts.{j}.{proj}_proj.weight"
            for i, layer in enumerate(self.layers)
            if layer.is_moe
            for j in range(layer.mlp.num_experts)
            if j not in layer.mlp.experts
            for proj in ("gate", "up", "down")
        }
