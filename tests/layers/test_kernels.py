"""The CPU bf16 matmul kernels: built where the CPU can run them, close to an exact product on packed weights,
row-invariant, interchangeable with the PyTorch path, and used by the engine's model."""

from __future__ import annotations

import pytest
import torch

from s1serve.layers import kernels

pytestmark = pytest.mark.usefixtures("kernel_path")  # each test on AVX-512 and on AMX (conftest.py)
needs_kernels = pytest.mark.skipif(not kernels.cpu_has_avx512_bf16(), reason="CPU without AVX512-BF16")


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def exact_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T


def test_built_exactly_where_the_cpu_has_avx512_bf16():
    assert (kernels.bf16_kernels() is not None) == kernels.cpu_has_avx512_bf16()


def test_a_build_is_announced_when_there_is_no_module_or_a_source_is_newer(tmp_path):
    import os

    source, built = tmp_path / "a.cpp", tmp_path / "a.so"
    source.write_text("//")
    assert kernels.is_stale(built, [source])  # nothing built yet: loading compiles
    built.write_bytes(b"")
    os.utime(source, (1000, 1000))
    assert not kernels.is_stale(built, [source])
    os.utime(source, (built.stat().st_mtime + 10,) * 2)
    assert kernels.is_stale(built, [source])


@needs_kernels
def test_a_process_takes_the_amx_tiles_exactly_where_the_cpu_has_them(monkeypatch):
    monkeypatch.delenv("S1SERVE_CPU_AMX", raising=False)
    kernels.bf16_kernels.cache_clear()
    try:
        assert kernels.bf16_kernels().amx() == kernels.cpu_has_amx_bf16()
        monkeypatch.setenv("S1SERVE_CPU_AMX", "0")
        kernels.bf16_kernels.cache_clear()
        assert not kernels.bf16_kernels().amx()
    finally:
        monkeypatch.undo()
        kernels.bf16_kernels.cache_clear()
        kernels.bf16_kernels()


@needs_kernels
def test_the_two_paths_round_differently_so_a_process_keeps_one(kernel_path):
    """Why the choice is made once per process: the same call gives other float32 sums on the other path."""
    if not kernels.cpu_has_amx_bf16():
        pytest.skip("CPU without AMX-BF16: one path only")
    module = kernels.bf16_kernels()
    x, packed = bf16(16, 1024, seed=30), kernels.pack(bf16(256, 1024, seed=31))
    mine = kernels.linear(x, packed, torch.float32)
    module.set_amx(kernel_path != "amx")
    other = kernels.linear(x, packed, torch.float32)
    module.set_amx(kernel_path == "amx")
    assert not torch.equal(mine, other)
    torch.testing.assert_close(mine, other, atol=1e-4, rtol=1e-5)


def test_only_bf16_cpu_weights_with_64_column_blocks_are_packed():
    assert kernels.pack(bf16(100, 64, seed=0)) is None  # 100 output features: not whole blocks of 64
    assert kernels.pack(torch.randn(64, 64)) is None  # float32 takes PyTorch
    packed = kernels.pack(bf16(128, 64, seed=0))
    assert (packed is not None) == kernels.cpu_has_avx512_bf16()


@needs_kernels
@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 13, 16, 17, 70])
@pytest.mark.parametrize("out_features", [64, 320])
@pytest.mark.parametrize("in_features", [96, 80])  # 80: not whole AMX steps of 32, so AVX-512 takes it
def test_linear_on_packed_weights_matches_the_exact_product(rows, out_features, in_features):
    x, w = bf16(rows, in_features, seed=rows), bf16(out_features, in_features, seed=out_features + 1)
    packed = kernels.pack(w)
    assert kernels.is_packed(packed) and packed.shape == (out_features // 64, in_features // 2, 64, 2)
    out = kernels.linear(x, packed, torch.float32)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    # float32 sums of exact bf16 products: far below one bf16 ulp of the result
    torch.testing.assert_close(out.double(), exact_linear(x, w), atol=1e-4, rtol=1e-5)
    # bf16 output: the float32 result rounded as PyTorch rounds it, in the kernel's own pass
    assert torch.equal(kernels.linear(x, packed), out.to(torch.bfloat16))


@needs_kernels
def test_each_row_is_the_same_whatever_else_is_in_the_batch():
    x, packed = bf16(37, 128, seed=0), kernels.pack(bf16(256, 128, seed=1))
    batched = kernels.linear(x, packed, torch.float32)
    for i in range(x.shape[0]):
        assert torch.equal(batched[i], kernels.linear(x[i : i + 1], packed, torch.float32)[0])
    assert torch.equal(batched[5:21], kernels.linear(x[5:21], packed, torch.float32))


@needs_kernels
def test_leading_dims_and_strided_rows_are_handled():
    w = bf16(64, 64, seed=3)
    packed = kernels.pack(w)
    x = bf16(2, 3, 64, seed=2)
    out = kernels.linear(x, packed, torch.float32)
    torch.testing.assert_close(out.double(), exact_linear(x.reshape(6, 64), w).view(2, 3, 64), atol=1e-4, rtol=1e-5)
    wide = bf16(5, 128, seed=4)
    assert torch.equal(kernels.linear(wide[:, :64], packed), kernels.linear(wide[:, :64].contiguous(), packed))


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_linears_put_each_weights_product_side_by_side_bitwise(rows):
    x = bf16(rows, 128, seed=rows)
    weights = [kernels.pack(bf16(n, 128, seed=n)) for n in (256, 64, 128)]
    out = kernels.linears(x, weights)
    assert out.shape == (rows, 448) and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.cat([kernels.linear(x, w) for w in weights], dim=1))
    with pytest.raises(RuntimeError, match="K = 128"):
        kernels.linears(x, [weights[0], kernels.pack(bf16(64, 96, seed=9))])


@needs_kernels
def test_grouped_linear_multiplies_each_segment_by_its_expert():
    experts = bf16(5, 128, 64, seed=5)
    x = bf16(11, 64, seed=6)
    ends = torch.tensor([3, 3, 4, 11, 11])  # experts 1 and 4 receive no rows
    out = kernels.grouped_linear(x, kernels.pack(experts), ends)
    assert out.dtype == torch.bfloat16
    out = out.double()
    expected = torch.cat([exact_linear(x[0:3], experts[0]), exact_linear(x[3:4], experts[2]),
                          exact_linear(x[4:11], experts[3])])
    torch.testing.assert_close(out, expected, atol=0.02, rtol=0.01)  # bf16 output: one rounding


@needs_kernels
def test_grouped_rows_do_not_depend_on_the_other_segments():
    packed = kernels.pack(bf16(3, 64, 32, seed=7))
    x = bf16(9, 32, seed=8)
    full = kernels.grouped_linear(x, packed, torch.tensor([2, 6, 9]))
    alone = kernels.grouped_linear(x[2:6], packed, torch.tensor([0, 4, 4]))
    assert torch.equal(full[2:6], alone)


@needs_kernels
def test_the_pytorch_path_gives_the_same_results():
    x, w = bf16(6, 64, seed=9), bf16(128, 64, seed=10)
    experts, ends = bf16(2, 64, 64, seed=11), torch.tensor([2, 6])
    torch.testing.assert_close(kernels.linear(x, kernels.pack(w), torch.float32),
                               kernels.linear(x.float(), w.float()), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kernels.grouped_linear(x, kernels.pack(experts), ends),
                               kernels.grouped_linear(x, experts, ends), atol=0.02, rtol=0.01)


def test_the_pytorch_grouped_path_handles_unaligned_shapes():
    x, experts, ends = bf16(6, 30, seed=12), bf16(2, 40, 30, seed=13), torch.tensor([2, 6])
    out = kernels.grouped_linear(x, experts, ends)  # K = 30: torch._grouped_mm cannot take it
    expected = torch.cat([exact_linear(x[:2], experts[0]), exact_linear(x[2:], experts[1])])
    torch.testing.assert_close(out.double(), expected, atol=0.02, rtol=0.01)


def test_the_engine_packs_bf16_weights_where_the_kernels_apply(tiny_checkpoint):
    from s1serve.engine.model_runner import ModelRunner
    from s1serve.models.registry import load_model

    model = load_model(tiny_checkpoint, torch.bfloat16)
    ModelRunner(model, num_blocks=4, block_size=16)
    layer = model.layers[0]
    # hidden 64: q/k/v/o, experts and lm_head come in whole blocks of 64 columns; the 16-expert router does not
    packed = [layer.self_attn.q_proj.weight, layer.mlp.w13, layer.mlp.w2, model.lm_head.weight]
    assert all(kernels.is_packed(w) for w in packed) == kernels.cpu_has_avx512_bf16()
    assert not kernels.is_packed(layer.mlp.gate.weight)
