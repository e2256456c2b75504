"""`s1serve quantize` and its parts: the block quantiser, the streamed safetensors writer, the published naming."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fp8_testing import read_tensors
from safetensors import safe_open

from s1serve.assets import ASSETS_DIR
from s1serve.checkpoint.fp8 import dequantize, quantize_blocks, scale_name
from s1serve.checkpoint.quantize import parse_size, quantization_config, quantize_checkpoint
from s1serve.checkpoint.stream import TensorInfo, Unit, write_shard, write_sharded
from s1serve.checkpoint.tiny import tensor_specs, tiny_config
from s1serve.config import load_model_config, parse_model_config

PUBLISHED = json.loads((ASSETS_DIR / "config.json").read_text())["quantization_config"]


def assert_within_fp8_rounding(weight: torch.Tensor, fp8: torch.Tensor, scale: torch.Tensor, slack: float = 1.0):
    """e4m3 keeps 3 mantissa bits: a value x = w / scale in the normal range [2^-6, 448] rounds to within
    2^-4 |x|; below it the spacing is 2^-9, so within 2^-10. Hence |dequantised - w| <= max(2^-4 |w|, 2^-10 scale)."""
    w = weight.float()
    got = dequantize(fp8, scale[None], torch.float32)
    per_element_scale = dequantize(torch.ones_like(fp8), scale[None], torch.float32)
    bound = torch.maximum(w.abs() * 2**-4, per_element_scale * 2**-10) * slack
    assert ((got - w).abs() <= bound).all(), float(((got - w).abs() / bound).max())


def test_scales_follow_the_formula_on_hand_computed_blocks():
    w = torch.zeros(130, 260)  # blocks: rows 128 + 2, cols 128 + 128 + 4
    w[5, 7] = -448.0  # amax 448: scale 2^0
    w[0, 200] = 450.0  # just above 448: scale 2^1, and 450 / 2 rounds to 224 in e4m3
    w[3, 259] = 1.0  # 1/448 = 2^-8.8: scale 2^-8
    # block (1, 0) stays all zero: scale 1
    w[129, 130] = 448 * 2**-5  # exactly a power of two times 448: scale 2^-5, not 2^-4
    w[128, 256] = 3.0e-3  # 3e-3/448 = 2^-17.03: scale 2^-17
    fp8, scale = quantize_blocks(w.to(torch.bfloat16))
    expected = torch.tensor([[1.0, 2.0, 2**-8], [1.0, 2**-5, 2**-17]])
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == (130, 260)
    assert scale.dtype == torch.float32 and torch.equal(scale, expected)
    assert fp8[5, 7].float() == -448 and fp8[0, 200].float() == 224 and fp8[3, 259].float() == 256
    assert fp8[129, 130].float() == 448

    fp8, scale = quantize_blocks(w, scale_fmt=None)
    amax = torch.tensor([[448.0, 450.0, 1.0], [0.0, 448 * 2**-5, 3.0e-3]])
    assert torch.equal(scale, torch.where(amax > 0, amax / 448, 1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_dequantised_values_are_within_fp8_rounding(dtype, scale_fmt):
    gen = torch.Generator().manual_seed(0)
    # Per-block magnitudes from 2^-12 to 2^6 so that scales differ, on a 300 x 320 weight (partial edge blocks).
    magnitude = torch.exp2(torch.randint(-12, 7, (3, 3), generator=gen).float())
    w = (torch.randn(300, 320, generator=gen) * magnitude.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :320])
    w = w.to(dtype)
    fp8, scale = quantize_blocks(w, scale_fmt)
    assert scale.shape == (3, 3)
    assert_within_fp8_rounding(w, fp8, scale, slack=1.0 if scale_fmt else 1.001)
    block_max = (fp8.float().abs().reshape(300, 320)).max()
    assert block_max <= 448
    if scale_fmt == "ue8m0":
        mantissa, _ = torch.frexp(scale)
        assert (mantissa == 0.5).all(), "ue8m0 scales are powers of two"
        # The largest value of every block lands in (224, 448]: the scale is the smallest power of two that fits.
        top = torch.nn.functional.pad(fp8.float().abs(), (0, 64, 0, 84)).view(3, 128, 3, 128).amax(dim=(1, 3))
        assert ((top > 224) & (top <= 448)).all(), top


def test_edge_blocks_are_their_own_blocks():
    w = torch.full((300, 320), 0.01)
    w[299, 319] = 100.0  # in the partial corner block only
    w[0, 256] = 1.0  # in the partial last column block of the first block row
    fp8, scale = quantize_blocks(w)
    expected = torch.full((3, 3), 2.0**-15)  # 0.01 / 448 = 2^-15.4
    expected[2, 2] = 2.0**-2  # 100 / 448 = 2^-2.16
    expected[0, 2] = 2.0**-8
    assert torch.equal(scale, expected)
    assert_within_fp8_rounding(w, fp8, scale)


def test_writer_output_loads_with_safe_open(tmp_path):
    tensors = {
        "odd_fp8": torch.randn(3, 5).to(torch.float8_e4m3fn),  # 15 bytes: would misalign what follows it
        "f32": torch.randn(7, 3),
        "bf16": torch.randn(9).to(torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "ids": torch.arange(5, dtype=torch.int64),
    }
    units = [Unit((TensorInfo(n, t.dtype, tuple(t.shape)),), lambda t=t: (t,)) for n, t in tensors.items()]
    write_shard(tmp_path / "x.safetensors", units)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)) if t.dim() else torch.equal(got, t)
    header_len = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "x.safetensors").read_bytes()[8 : 8 + header_len])
    assert header_len % 8 == 0
    for name, t in tensors.items():
        assert header[name]["data_offsets"][0] % t.dtype.itemsize == 0, f"{name} is not aligned"


def test_modules_to_not_convert_are_the_published_kinds():
    cfg = parse_model_config(tiny_config("tiny"))
    ours = quantization_config(s.info for s in tensor_specs(cfg))
    assert {k: v for k, v in ours.items() if k != "modules_to_not_convert"} == {
        k: v for k, v in PUBLISHED.items() if k != "modules_to_not_convert"
    }
    last = {m.rsplit(".", 1)[-1] for m in ours["modules_to_not_convert"]}
    assert last == {m.rsplit(".", 1)[-1] for m in PUBLISHED["modules_to_not_convert"]}
    # Exactly the published list, restricted to the layers and vision blocks the tiny preset has.
    kept_layers, kept_blocks = cfg.text.num_hidden_layers, cfg.vision.depth

    def present(module: str) -> bool:
        layer = re.search(r"\.layers\.(\d+)\.", module)
        block = re.search(r"\.blocks\.(\d+)\.", module)
        return (not layer or int(layer[1]) < kept_layers) and (not block or int(block[1]) < kept_blocks)

    assert ours["modules_to_not_convert"] == sorted(filter(present, PUBLISHED["modules_to_not_convert"]))


def test_shard_sizes_parse_like_huggingface_writes_them():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 << 20 and parse_size("1234") == 1234
    assert parse_size("1.5kb") == 1500
    for bad in ("5XB", "GB", "0", "-1MB"):
        with pytest.raises(ValueError, match="bad size"):
            parse_size(bad)


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory) -> Path:
    return quantize_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("q") / "fp8", shard_bytes=8 << 20)


def test_quantized_checkpoint_layout(tiny_checkpoint, quantized):
    src_index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    index = json.loads((quantized / "model.safetensors.index.json").read_text())
    config = json.loads((quantized / "config.json").read_text())
    skipped = set(config["quantization_config"]["modules_to_not_convert"])
    quantised = [n for n in src_index if n.rsplit(".", 1)[0] not in skipped]
    assert len(quantised) == 2 * (4 + 16 * 3) and all(n.endswith("_proj.weight") for n in quantised)
    assert set(index["weight_map"]) == set(src_index) | {scale_name(n) for n in quantised}
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    stored = {}
    for shard in shards:
        with safe_open(str(quantized / shard), framework="pt") as f:
            stored.update({name: shard for name in f.keys()})
    assert stored == index["weight_map"]
    got, src = read_tensors(quantized), read_tensors(tiny_checkpoint)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())
    for name, tensor in src.items():
        if name in quantised:
            assert got[name].dtype == torch.float8_e4m3fn and got[name].shape == tensor.shape
            assert_within_fp8_rounding(tensor, got[name], got[scale_name(name)])
        else:
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name

    src_config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == src_config
    assert load_model_config(quantized).quantization.modules_to_not_convert == tuple(sorted(skipped))
    side = {p.name for p in tiny_checkpoint.iterdir()} - {"config.json", "model.safetensors.index.json"}
    side = {n for n in side if not n.endswith(".safetensors")}
    assert side and {p.name for p in quantized.iterdir()} == side | {"config.json", "model.safetensors.index.json", *shards}
    for name in side:
        assert (quantized / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name


def test_a_single_model_safetensors_source_and_the_qwen3_moe_layout(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    config = tiny_config("tiny", "qwen3_moe")
    (src / "config.json").write_text(json.dumps(config))
    w = torch.randn(96, 64).to(torch.bfloat16)
    tensors = {"model.layers.0.self_attn.q_proj.weight": w, "model.layers.0.mlp.gate.weight": w[:16].clone(), "model.norm.weight": w[0].clone()}
    save_file(tensors, str(src / "model.safetensors"))
    out = quantize_checkpoint(src, tmp_path / "dst")
    got = read_tensors(out)
    assert set(got) == {*tensors, "model.layers.0.self_attn.q_proj.weight_scale_inv"}
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    written = json.loads((out / "config.json").read_text())
    assert written["quantization_config"]["modules_to_not_convert"] == ["model.layers.0.mlp.gate", "model.norm"]
    assert {k: v for k, v in written.items() if k != "quantization_config"} == config


MEMORY_PROBE = """
import resource, sys, torch
from s1serve.checkpoint.fp8 import quantize_blocks
from s1serve.checkpoint.quantize import quantize_checkpoint
quantize_blocks(torch.randn(1024, 1024).to(torch.bfloat16))  # one tensor's worth of allocations, before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
quantize_checkpoint(sys.argv[1], sys.argv[2], shard_bytes=64 << 20)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_peak_memory_is_a_few_tensors_not_the_checkpoint(tmp_path):
    """96 tensors of 2 MiB in 64 MiB shards: reading, quantising and writing must not accumulate them (reading
    through mmap keeps whole shards resident: the growth is then about the checkpoint's size, here ~18 MiB)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny_config("tiny", "qwen3_moe")))
    names = [f"model.layers.0.mlp.experts.{j}.{p}_proj.weight" for j in range(32) for p in ("gate", "up", "down")]
    units = [
        Unit((TensorInfo(n, torch.bfloat16, (1024, 1024)),), lambda: (torch.randn(1024, 1024).to(torch.bfloat16),))
        for n in names
    ]
    write_sharded(src, units, 64 << 20)
    size = sum(u.nbytes for u in units)
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(src), str(tmp_path / "dst")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.split()[-1])
    assert growth < size / 4, f"peak resident memory grew by {growth >> 20} MiB quantising {size >> 20} MiB"
