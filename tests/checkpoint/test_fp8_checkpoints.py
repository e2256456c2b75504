"""FP8 checkpoints in the published layout (float8_e4m3fn weights with 128x128 block scales) load, stay FP8 in
memory, and generate exactly what a BF16 checkpoint holding the dequantised weights generates.

Two FP8 writers: `s1serve quantize` and a few independent lines of plain torch (fp8_testing.py), both from a
make-tiny `edge` checkpoint whose hidden size (320) is above 128 and not a multiple of it, so edge blocks occur.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fp8_testing import read_tensors, resident_bytes, write_dequantised_twin, write_plain_fp8
from safetensors.torch import save_file

from s1serve import LLM, SamplingParams
from s1serve.checkpoint.tiny import write_tiny_checkpoint
from s1serve.config import load_model_config
from s1serve.errors import CheckpointError
from s1serve.models.registry import build_model, load_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE_ARGS = dict(block_size=16, num_kv_blocks=160)
Q_PROJ = "model.language_model.layers.1.self_attn.q_proj.weight"
EXPERT = "model.language_model.layers.0.mlp.experts.5.down_proj.weight"


def prompts() -> list[list[int]]:
    """Prompts of 1 to 333 ordinary tokens."""
    rng = random.Random(11)
    return [[rng.randrange(1000, 150000) for _ in range(n)] for n in (1, 7, 40, 333, 96)]


@pytest.fixture(scope="module")
def edge_bf16(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("edge_bf16"), preset="edge", seed=3)


@pytest.fixture(scope="module")
def plain_fp8(edge_bf16, tmp_path_factory) -> Path:
    return write_plain_fp8(edge_bf16, tmp_path_factory.mktemp("plain_fp8"))


@pytest.fixture(scope="module")
def quantized_fp8(edge_bf16, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "fp8"
    done = subprocess.run([sys.executable, "-m", "s1serve", "quantize", str(edge_bf16), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def greedy(checkpoint: Path, batched: bool = True, dtype: str = "float32") -> list[list[int]]:
    llm = LLM(str(checkpoint), dtype=dtype, skip_tokenizer_init=True, **ENGINE_ARGS)
    try:
        if batched:
            outs = llm.generate(prompt_token_ids=prompts(), sampling_params=GREEDY, use_tqdm=False)
        else:
            outs = [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False)[0] for p in prompts()]
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.shutdown()


def test_the_edge_checkpoint_has_partial_blocks(plain_fp8):
    scales = read_tensors(plain_fp8)
    assert scales[Q_PROJ].shape == (512, 320) and scales[Q_PROJ + "_scale_inv"].shape == (4, 3)
    assert scales[EXPERT].shape == (320, 256) and scales[EXPERT + "_scale_inv"].shape == (3, 2)


def test_s1serve_quantize_writes_what_plain_torch_writes(quantized_fp8, plain_fp8):
    ours, plain = read_tensors(quantized_fp8), read_tensors(plain_fp8)
    assert set(ours) == set(plain)
    differing = [n for n in plain if ours[n].dtype != plain[n].dtype or not torch.equal(ours[n].view(torch.uint8)
                 if ours[n].dtype == torch.float8_e4m3fn else ours[n], plain[n].view(torch.uint8)
                 if plain[n].dtype == torch.float8_e4m3fn else plain[n])]
    assert not differing, differing[:5]


@pytest.mark.parametrize("writer", ["plain_fp8", "quantized_fp8"])
def test_fp8_greedy_ids_equal_the_dequantised_bf16_twin(writer, request, tmp_path):
    fp8_dir = request.getfixturevalue(writer)
    twin = write_dequantised_twin(fp8_dir, tmp_path / "twin")
    want = greedy(twin)
    got = greedy(fp8_dir)
    assert got == want
    assert greedy(fp8_dir, batched=False) == got


def test_fp8_in_bfloat16_equals_the_twin_in_bfloat16(plain_fp8, tmp_path):
    """The bf16 path: the FP8 kernel (or its fallback) against the bf16 kernel on the dequantised weights."""
    twin = write_dequantised_twin(plain_fp8, tmp_path / "twin")
    got = greedy(plain_fp8, dtype="bfloat16")
    assert got == greedy(twin, dtype="bfloat16")
    assert greedy(plain_fp8, batched=False, dtype="bfloat16") == got


def test_fp8_weights_stay_fp8_in_memory(plain_fp8):
    model = load_model(plain_fp8, "bfloat16")
    weight = model.layers[1].self_attn.q_proj
    assert weight.weight.dtype == torch.float8_e4m3fn and weight.weight_scale_inv.dtype == torch.float32
    assert model.layers[0].mlp.w13.dtype == model.layers[0].mlp.w2.dtype == torch.float8_e4m3fn
    assert model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16


def test_resident_weight_bytes_are_at_most_055x_the_bf16_twin(edge_bf16, tmp_path):
    """On a checkpoint whose decoder outweighs its embeddings as in the published model (there the quantised
    linears are 99.7% of the bytes), here by a 2048-entry vocabulary and 64 experts."""
    small = tmp_path / "small"
    small.mkdir()
    config = json.loads((edge_bf16 / "config.json").read_text())
    config["text_config"].update(vocab_size=2048, num_experts=64, router_n_groups=8, num_experts_per_tok=8)
    (small / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    meta = build_model(load_model_config(small), "bfloat16", "meta")
    tensors = {
        name: (torch.randn(target.shape, generator=gen) * 0.05).to(torch.bfloat16)
        for name, target in meta.checkpoint_targets().items()
    }
    save_file(tensors, str(small / "model.safetensors"), metadata={"format": "pt"})
    fp8_dir = write_plain_fp8(small, tmp_path / "small_fp8")
    bf16_bytes = resident_bytes(load_model(small, "bfloat16"))
    fp8_bytes = resident_bytes(load_model(fp8_dir, "bfloat16"))
    print(f"resident weight bytes: BF16 {bf16_bytes}, FP8 {fp8_bytes}, ratio {fp8_bytes / bf16_bytes:.3f}")
    assert fp8_bytes <= 0.55 * bf16_bytes


def _edit_fp8(fp8_dir: Path, out: Path, change) -> Path:
    shutil.copytree(fp8_dir, out)
    tensors = read_tensors(out)
    change(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop(Q_PROJ + "_scale_inv"), f"missing tensor '{Q_PROJ}_scale_inv'"),
        (lambda t: t.update({Q_PROJ + "_scale_inv": torch.ones(4, 2)}),
         rf"tensor '{Q_PROJ}_scale_inv' has shape \[4, 2\], expected \[4, 3\]"),
        (lambda t: t.update({Q_PROJ: t[Q_PROJ].to(torch.bfloat16)}),
         f"tensor '{Q_PROJ}' is stored as BF16, but the config's quantization_config makes it an FP8 weight"),
        (lambda t: t.update({EXPERT: t[EXPERT].to(torch.float32)}), f"tensor '{EXPERT}' is stored as F32"),
        (lambda t: t.update({"lm_head.weight": t["lm_head.weight"].to(torch.float8_e4m3fn)}),
         "tensor 'lm_head.weight' is stored as F8_E4M3, but the config does not quantise it"),
    ],
    ids=["missing-scale", "scale-shape", "bf16-weight", "f32-expert", "fp8-lm-head"],
)
def test_bad_fp8_tensors_are_named(plain_fp8, tmp_path, change, message):
    bad = _edit_fp8(plain_fp8, tmp_path / "bad", change)
    with pytest.raises(CheckpointError, match=message):
        load_model(bad)


def test_the_cli_names_a_missing_scale_in_one_line_and_exits_2(plain_fp8, tmp_path):
    bad = _edit_fp8(plain_fp8, tmp_path / "bad", lambda t: t.pop(Q_PROJ + "_scale_inv"))
    done = subprocess.run([sys.executable, "-m", "s1serve", "generate", str(bad), "--prompt", "hi", "--max-tokens", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {bad}: missing tensor '{Q_PROJ}_scale_inv'"
