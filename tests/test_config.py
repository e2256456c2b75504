import copy
import json

import pytest

from s1serve.assets import ASSETS_DIR
from s1serve.config import load_generation_defaults, load_model_config, parse_model_config
from s1serve.errors import ConfigError

PUBLISHED = json.loads((ASSETS_DIR / "config.json").read_text())


def test_published_config_parses_with_its_facts():
    cfg = load_model_config(ASSETS_DIR)
    t = cfg.text
    assert (cfg.model_type, t.num_hidden_layers, t.hidden_size) == ("interns1_pro", 94, 4096)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (64, 4, 128)
    assert (t.num_experts, t.num_experts_per_tok, t.router_n_groups, t.moe_intermediate_size) == (512, 8, 8, 1536)
    assert t.fope is not None and t.fope.sep_head and t.fope.num_inv_freq is None
    assert cfg.vision.depth == 24 and cfg.vision.out_hidden_size == 4096
    q = cfg.quantization
    assert q.weight_block_size == (128, 128) and q.scale_fmt == "ue8m0" and len(q.modules_to_not_convert) == 623


def test_generation_defaults_come_from_the_checkpoint():
    d = load_generation_defaults(ASSETS_DIR)
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.8, 0.95, 50, 1.0)
    assert d.eos_token_ids == (151645, 151643)


def test_text_only_model_type_parses():
    text = dict(PUBLISHED["text_config"])
    cfg = parse_model_config(text)
    assert cfg.model_type == "interns1_pro_text" and cfg.vision is None and cfg.text.router_n_groups == 8


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="llama"), "model_type 'llama' is not supported"),
        (lambda c: c.pop("text_config"), "needs a 'text_config'"),
        (lambda c: c["text_config"].pop("hidden_size"), "missing field 'hidden_size'"),
        (lambda c: c["text_config"].update(num_key_value_heads=5), "num_attention_heads (64) must be a multiple of num_key_value_heads (5)"),
        (lambda c: c["text_config"].update(router_n_groups=7), "num_experts (512) must be a multiple of router_n_groups (7)"),
        (lambda c: c["text_config"].update(num_experts_per_tok=12), "num_experts_per_tok (12) must be a multiple of router_n_groups (8)"),
        (lambda c: c["text_config"].update(hidden_size="4096"), "field 'hidden_size' must be int"),
        (lambda c: c["vision_config"].update(out_hidden_size=1024), "out_hidden_size (1024) must equal text_config.hidden_size (4096)"),
        (lambda c: c["vision_config"].update(hidden_act="quick_gelu"), "hidden_act 'quick_gelu' is not supported (only 'gelu_pytorch_tanh')"),
        (lambda c: c["vision_config"].update(num_heads=512), "hidden_size / num_heads (2) must be a multiple of 4"),
        (lambda c: c["quantization_config"].update(quant_method="awq"), "quant_method 'awq' is not supported (supported: quant_method 'fp8'"),
        (lambda c: c["quantization_config"].update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
        (lambda c: c["quantization_config"].update(fmt="e5m2"), "fmt 'e5m2' is not supported"),
        (lambda c: c["quantization_config"].update(fmt="mxfp4"), "fmt 'mxfp4' is not supported"),
        (lambda c: c["quantization_config"].update(weight_block_size=[64, 64]), "weight_block_size [64, 64] is not supported"),
        (lambda c: c["quantization_config"].update(weight_block_size=[128]), "weight_block_size must be two positive ints"),
        (lambda c: c["quantization_config"].update(activation_scheme="static"), "activation_scheme 'static' is not supported"),
        (lambda c: c["quantization_config"].update(scale_fmt="e8m0fnu"), "scale_fmt 'e8m0fnu' is not supported"),
        (lambda c: c["text_config"]["rope_scaling"].update(rope_type="yarn"), "FoPE needs rope_scaling.rope_type 'default'"),
    ],
)
def test_inconsistent_configs_name_the_field(edit, message, tmp_path):
    data = copy.deepcopy(PUBLISHED)
    edit(data)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_model_config(tmp_path)
    assert message in str(err.value)
    assert str(tmp_path / "config.json") in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json: file not found"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["x"]}))
    with pytest.raises(ConfigError, match="eos_token_id"):
        load_generation_defaults(tmp_path)
