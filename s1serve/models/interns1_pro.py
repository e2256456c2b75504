"""The Intern-S1-Pro text decoder (also serves qwen3_moe: the same decoder with plain RoPE and top-k routing).

Per layer: x += Attn(RMSNorm(x)); x += MoE(RMSNorm(x)); then a final RMSNorm and an untied lm_head. The forward
takes a flat batch of tokens from many sequences with their positions and the paged KV cache.

Built with a ParallelContext, the model holds only this rank's shard: attention heads, the vocabulary and (without
EP) each expert's intermediate dimension split over tp; experts partitioned over ep; norms, router and (without
sep_head) the FoPE coefficients replicated; the vision tower (vision.py), when the checkpoint has one, whole on
every rank. `checkpoint_targets` says which slice of which checkpoint tensor
each parameter receives, so loading reads only that slice. Under DP attention with EP every rank calls either
`forward` (with its tokens) or `idle_step` (without) in each step, since MoE layers exchange tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from s1serve.checkpoint.fope import fope_coef_shape
from s1serve.checkpoint.loader import VISION_PREFIX, Target
from s1serve.config import ModelConfig, TextConfig
from s1serve.errors import ConfigError
from s1serve.layers.attention import Attention, AttentionBatch, KVCache, kv_head_range
from s1serve.layers.linear import ParallelLMHead, ShardedWeight, VocabParallelEmbedding, WeightFormats
from s1serve.layers.moe import PROJECTIONS, DenseMLP, Fp8SparseMoE, SparseMoE, exchange_token_counts
from s1serve.layers.norm import RMSNorm
from s1serve.layers.rotary import FourierEmbedding, build_position_encoding
from s1serve.models.vision import VisionTower
from s1serve.parallel.context import ParallelContext


def moe_class(cfg: TextConfig, formats: WeightFormats, prefix: str) -> type[SparseMoE]:
    """Fp8SparseMoE when the checkpoint quantised the experts of the MoE at `prefix` (all of them or none)."""
    kinds = {
        formats.is_fp8(f"{prefix}experts.{j}.{proj}_proj") for j in range(cfg.num_experts) for proj in PROJECTIONS
    }
    if len(kinds) > 1:
        raise ConfigError(f"quantization_config.modules_to_not_convert lists some experts of {prefix[:-1]} but not all: "
                          "s1serve needs every expert of a layer in one format")
    return Fp8SparseMoE if kinds == {True} else SparseMoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int, ctx: ParallelContext, formats: WeightFormats, prefix: str):
        """`prefix`: this layer's checkpoint name plus a dot."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ctx, formats, f"{prefix}self_attn.")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        if self.is_moe:
            self.mlp = moe_class(cfg, formats, f"{prefix}mlp.")(cfg, ctx)
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, ctx, formats, f"{prefix}mlp.")

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
        formats = WeightFormats(config.quantization)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, parallel, formats, f"{config.weight_prefix}layers.{i}.")
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, parallel)
        self.visual = VisionTower(config.vision) if config.vision is not None else None
        for param in self.parameters():
            param.requires_grad_(False)

    @property
    def has_vision(self) -> bool:
        return self.visual is not None

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision features [sum(t*h*w) / merge^2, hidden] of processed images or video frames (vision.py), one
        row per `<|image_pad|>`/`<|video_pad|>` token, items in order."""
        if self.visual is None:
            raise ConfigError("this checkpoint has no vision tower (no vision_config or no model.visual.* tensors): "
                              "it takes text only")
        return self.visual(pixel_values, grid_thw)

    def embed(
        self, input_ids: torch.Tensor, media_rows: torch.Tensor | None = None, media_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings [T, hidden]; with media, rows `media_rows` (the pad tokens' rows, in order) are replaced
        by `media_embeds` (encode_images output), as the reference scatters them into the placeholders."""
        x = self.embed_tokens(input_ids)
        if media_rows is None:
            return x
        if media_embeds is None or media_embeds.shape != (media_rows.numel(), x.shape[1]):
            got = None if media_embeds is None else list(media_embeds.shape)
            raise ValueError(f"media_embeds must be [{media_rows.numel()}, {x.shape[1]}] for {media_rows.numel()} "
                             f"media rows, got {got}")
        return x.index_copy(0, media_rows.to(x.device), media_embeds.to(x.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        caches: list[KVCache],
        batch: AttentionBatch,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns the final hidden states [T, hidden]. `inputs_embeds` [T, hidden]
        (from `embed`, e.g. with vision features in place) replaces the embedding of input_ids. Positions are plain
        token positions for text and media alike, as in the reference."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
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
        needs; experts of other EP ranks are in checkpoint_names_elsewhere). FP8 weights bring their scales."""
        cfg = self.config.text
        prefix = self.config.weight_prefix
        sharded = {name: m for name, m in self.named_modules() if isinstance(m, ShardedWeight)}
        moes = {name: m for name, m in self.named_modules() if isinstance(m, SparseMoE)}
        fope_rows = isinstance(self.rotary_emb, FourierEmbedding) and self.rotary_emb.sep_head
        targets: dict[str, Target] = {}
        for name, param in self.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if name.startswith("visual."):
                targets[VISION_PREFIX + name.removeprefix("visual.")] = Target.whole(param)  # replicated
                continue
            checkpoint_name = name if name.startswith("lm_head.") else prefix + name
            if owner in moes or (owner in sharded and leaf != "weight"):
                continue  # expert stacks and FP8 scales: their modules name the tensors they read (below)
            if owner in sharded:
                targets.update(sharded[owner].checkpoint_targets(checkpoint_name))
            elif fope_rows and name.startswith("rotary_emb."):
                targets[checkpoint_name] = Target.part(param, fope_coef_shape(cfg), 0, self.rotary_emb.kv_heads)
            else:
                targets[checkpoint_name] = Target.whole(param)
        for name, moe in moes.items():
            targets.update(moe.checkpoint_targets(f"{prefix}{name}."))
        return targets

    def checkpoint_prefixes_ignored(self) -> tuple[str, ...]:
        """Checkpoint parts this model does not build: the vision tensors when it has no vision tower."""
        return () if self.has_vision else (VISION_PREFIX,)

    def checkpoint_names_elsewhere(self) -> set[str]:
        """Checkpoint tensors that other EP ranks load (their experts): this rank neither reads nor refuses them."""
        prefix = self.config.weight_prefix
        return {
            tensor
            for name, m in self.named_modules()
            if isinstance(m, SparseMoE)
            for tensor in m.checkpoint_names_elsewhere(f"{prefix}{name}.")
        }
