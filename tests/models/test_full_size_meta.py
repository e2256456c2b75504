import torch

from s1serve.assets import ASSETS_DIR
from s1serve.config import load_model_config
from s1serve.models.registry import build_model


def test_full_size_model_builds_on_meta_with_about_1e12_parameters():
    cfg = load_model_config(ASSETS_DIR)
    model = build_model(cfg, "bfloat16", device="meta")
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    total = sum(p.numel() for p in params)
    t = cfg.text
    experts = t.num_hidden_layers * t.num_experts * 3 * t.hidden_size * t.moe_intermediate_size
    # The text decoder alone is 9.17e11 parameters; the published "1T" rounds it (plus a 0.4B vision tower).
    print(f"full-size text decoder on meta: {total:.3e} parameters")
    assert 0.9e12 < total < 1.1e12, total
    assert experts / total > 0.95
    # Every parameter has a checkpoint name, and the names follow the published layout.
    targets = model.checkpoint_targets()
    assert "model.language_model.layers.93.mlp.experts.511.down_proj.weight" in targets
    assert targets["lm_head.weight"].shape == torch.Size([t.vocab_size, t.hidden_size])
