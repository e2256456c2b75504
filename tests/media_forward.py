"""Test helper: s1serve's model on a prompt with pictures or video, by naive full forwards (no cache reuse).

What the engine will do with media, in its simplest form: the vision tower encodes the pixel values, the
features replace the pad tokens' embeddings one for one, in order, and the decoder runs on plain 1-D token
positions (the reference's positions for text, pictures and video alike). Each greedy step recomputes the whole
sequence in a fresh KV cache, so nothing but the model itself is involved.
"""

from __future__ import annotations

import torch

from s1serve.layers.attention import AttentionBatch

BLOCK_SIZE = 16


@torch.inference_mode()
def media_last_logits(model, ids: list[int], features: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Float32 logits [vocab] at the last position of `ids`, with `features` in place of the `pad_id` tokens."""
    cfg = model.config.text
    param = next(model.parameters())
    blocks = -(-len(ids) // BLOCK_SIZE)
    shape = (model.num_local_kv_heads, blocks, BLOCK_SIZE, cfg.head_dim)
    caches = [(param.new_zeros(shape), param.new_zeros(shape)) for _ in range(cfg.num_hidden_layers)]
    batch = AttentionBatch.build([len(ids)], [0], [list(range(blocks))], BLOCK_SIZE, param.device)
    input_ids = torch.tensor(ids, dtype=torch.long, device=param.device)
    rows = torch.nonzero(input_ids == pad_id).flatten()
    embeds = model.embed(input_ids, rows, features)
    hidden = model(input_ids, batch.positions, caches, batch, inputs_embeds=embeds)
    return model.compute_logits(hidden[-1:])[0]


@torch.inference_mode()
def media_greedy_ids(
    model, prompt_ids: list[int], pixel_values: torch.Tensor, grid_thw: torch.Tensor, pad_id: int, steps: int
) -> list[int]:
    """`steps` greedy ids after the prompt, the media encoded once by s1serve's vision tower."""
    features = model.encode_images(pixel_values, grid_thw)
    seq, out = list(prompt_ids), []
    for _ in range(steps):
        out.append(int(media_last_logits(model, seq, features, pad_id).argmax()))
        seq.append(out[-1])
    return out
