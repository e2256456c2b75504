"""The Intern-S1-Pro vision tower (Qwen3-VL style, no deepstack): pixel patches -> text-hidden-size features.

Input is what the processor produces: `pixel_values` [N, C * temporal_patch * patch * patch], one row per
(temporal 2 x 16 x 16) patch, the patches of each image or video already in 2x2-merge-block order, and
`grid_thw` [items, 3] (temporal groups, patch rows, patch columns per item). Steps:
1. patch embedding: a Conv3d whose kernel equals its stride, i.e. one linear map per flattened patch;
2. plus learned position embeddings, a square table bilinearly interpolated (corners aligned) to the item's
   patch grid and repeated over its temporal groups;
3. blocks: x += Attn(LayerNorm(x)); x += MLP(LayerNorm(x)), the attention bidirectional within one temporal
   group of one item (never across items or frames) with 2-D rotary (row, column) on the queries and keys;
4. merger: LayerNorm, then each 2x2 block of neighbouring patches (4 consecutive rows) -> fc1 -> GELU -> fc2.
Output: [N / merge^2, out_hidden_size], one row per image/video pad token, items in input order.

The tower is small (0.4B parameters at full size) and replicated on every rank; it is never quantised.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from s1serve.config import VisionConfig
from s1serve.layers.rotary import inverse_frequencies, rotate_half

ROTARY_THETA = 10000.0
LAYER_NORM_EPS = 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # A stride-equals-kernel convolution over one patch is a dot product with the flattened kernel.
        return F.linear(pixels, self.proj.weight.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: "Segments") -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # Rotary in float32, as the reference applies it, whatever the tower's dtype.
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        return self.proj(segments.attend(q, k, v).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # hidden_act gelu_pytorch_tanh, the only one config.py accepts
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: "Segments") -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exact (erf) GELU here, unlike the blocks' tanh approximation: the reference uses nn.GELU()
        return self.linear_fc2(F.gelu(self.linear_fc1(self.norm(x).view(-1, self.merged))))


class Segments:
    """The attention segments of a patch sequence: each temporal group of each item attends only to itself.

    Segments of equal length are attended as one batch (all frames of a video, equal-sized images), so the work
    is a few batched calls whatever the number of frames, and no [N, N] mask is ever built.
    """

    def __init__(self, grid_thw: torch.Tensor, device: torch.device):
        lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cpu()
        starts = torch.cumsum(lengths, 0) - lengths
        self.total = int(lengths.sum())
        self.buckets = [
            (starts[lengths == length][:, None] + torch.arange(int(length))[None, :]).to(device)
            for length in torch.unique(lengths).tolist()
        ]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [N, heads, head_dim] -> [N, heads, head_dim]."""
        out = torch.empty_like(q)
        for rows in self.buckets:  # rows: [segments, length]
            qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))  # [segments, heads, length, head_dim]
            out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
        return out


class VisionTower(nn.Module):
    """Checkpoint names under `model.visual.`: patch_embed.proj, pos_embed, blocks.{i}.{norm1, attn.qkv,
    attn.proj, norm2, mlp.linear_fc1, mlp.linear_fc2}, merger.{norm, linear_fc1, linear_fc2}."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.merge = cfg.spatial_merge_size
        self.grid_side = int(cfg.num_position_embeddings**0.5)
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        # float32 and outside the buffers: building on meta or casting to bf16 never touches it
        self._inv_freq = inverse_frequencies(cfg.hidden_size // cfg.num_heads // 2, ROTARY_THETA)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P], grid_thw [items, 3] -> features [N / merge^2, out_hidden_size]."""
        grid_thw = self._check(pixel_values, grid_thw)
        device = self.pos_embed.weight.device
        x = self.patch_embed(pixel_values.to(device, self.dtype))
        x = x + self._position_embeddings(grid_thw)
        cos, sin = self._rotary(grid_thw)
        segments = Segments(grid_thw, device)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x)

    def _check(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        grid_thw = torch.as_tensor(grid_thw, dtype=torch.long).cpu()
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or (grid_thw <= 0).any():
            raise ValueError(f"grid_thw must be [items, 3] positive (t, h, w) patch counts, got {grid_thw.tolist()}")
        if ((grid_thw[:, 1:] % self.merge) != 0).any():
            raise ValueError(f"grid_thw h and w must be multiples of spatial_merge_size {self.merge}, "
                             f"got {grid_thw.tolist()}")
        patches = int(grid_thw.prod(-1).sum())
        if pixel_values.ndim != 2 or tuple(pixel_values.shape) != (patches, width):
            raise ValueError(f"pixel_values must be [{patches}, {width}] for grid_thw {grid_thw.tolist()}, "
                             f"got {list(pixel_values.shape)}")
        return grid_thw

    def _merge_order(self, t: int, h: int, w: int) -> torch.Tensor:
        """Row-major patch index (r * w + c) of each patch in 2x2-merge-block order, for one temporal group."""
        m = self.merge
        grid = torch.arange(h * w).view(h // m, m, w // m, m)
        return grid.permute(0, 2, 1, 3).reshape(-1)

    def _position_embeddings(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The learned table bilinearly interpolated (corner-aligned) to each item's grid: [N, hidden]."""
        side = self.grid_side
        table = self.pos_embed.weight
        out = []
        for t, h, w in grid_thw.tolist():
            rows = torch.linspace(0, side - 1, h)  # float32, as the reference computes them
            cols = torch.linspace(0, side - 1, w)
            r0, c0 = rows.int(), cols.int()
            r1, c1 = (r0 + 1).clamp(max=side - 1), (c0 + 1).clamp(max=side - 1)
            dr, dc = (rows - r0)[:, None], (cols - c0)[None, :]
            corners = (
                (r0[:, None] * side + c0[None, :], (1 - dr) * (1 - dc)),
                (r0[:, None] * side + c1[None, :], (1 - dr) * dc),
                (r1[:, None] * side + c0[None, :], dr * (1 - dc)),
                (r1[:, None] * side + c1[None, :], dr * dc),
            )
            order = self._merge_order(t, h, w).to(table.device)
            emb = None
            for index, weight in corners:  # summed in this order, like the reference
                term = table[index.reshape(-1).to(table.device)] * weight.reshape(-1, 1).to(table.device, table.dtype)
                emb = term if emb is None else emb + term
            out.append(emb[order].repeat(t, 1))
        return torch.cat(out)

    def _rotary(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos, sin [N, 1, head_dim]: the patch's row angles then column angles, the pair repeated."""
        rows, cols = [], []
        for t, h, w in grid_thw.tolist():
            order = self._merge_order(t, h, w)
            rows.append((order // w).repeat(t))
            cols.append((order % w).repeat(t))
        device = self.pos_embed.weight.device
        inv_freq = self._inv_freq.to(device)
        angles = torch.cat(
            (torch.cat(rows).to(device, torch.float32)[:, None] * inv_freq,
             torch.cat(cols).to(device, torch.float32)[:, None] * inv_freq),
            dim=-1,
        )
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]
        return emb.cos(), emb.sin()
