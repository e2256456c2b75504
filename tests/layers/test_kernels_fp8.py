"""FP8 weight-only matmuls: the PyTorch fallback is exactly dequantize + F.linear; the CPU kernel on packed weights
is bitwise the bf16 kernel on the dequantized weights (all codes, any scale, edge blocks, segments, any row count);
packing happens exactly where the kernel applies; the CUDA path is never taken on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from s1serve.checkpoint.fp8 import FP8_DTYPE, dequantize
from s1serve.layers import kernels
from s1serve.layers.kernels import fp8 as fp8_kernels

pytestmark = pytest.mark.usefixtures("kernel_path")  # each test on AVX-512 and on AMX (conftest.py)
needs_kernels = pytest.mark.skipif(
    not (kernels.cpu_has_avx512_bf16() and kernels.cpu_has_avx512_vbmi()),
    reason="the FP8 kernel needs AVX512-BF16 and AVX512-VBMI, which this CPU lacks",
)
NAN_CODES = (0x7F, 0xFF)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fp8(*shape: int, seed: int) -> torch.Tensor:
    """Uniformly random bytes: every code, NaN codes replaced by +-0."""
    codes = torch.randint(0, 256, shape, generator=gen(seed), dtype=torch.uint8)
    return torch.where((codes & 0x7F) == 0x7F, codes & 0x80, codes).view(FP8_DTYPE)


def scales(*lead: int, segments: int, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Segmented block scales of a [.., rows, cols] weight, not powers of two."""
    shape = (*lead, segments, math.ceil(rows / segments / 128), math.ceil(cols / 128))
    return torch.rand(shape, generator=gen(seed)) * 0.02 + 1e-3


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)).to(torch.bfloat16)


def bf16_kernel_reference(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return kernels.pack(dequantize(w, scale, torch.bfloat16))


def test_the_fallback_is_dequantize_then_linear():
    w, scale = fp8(192, 320, seed=0), scales(segments=1, rows=192, cols=320, seed=1)
    for x in (bf16(2, 3, 320, seed=2), torch.randn(4, 320, generator=gen(3))):
        expected = F.linear(x, dequantize(w, scale, x.dtype))
        assert torch.equal(kernels.fp8_linear(x, w, scale), expected)
        assert torch.equal(kernels.fp8_linear(x, w, scale, torch.float32), expected.float())


def test_the_grouped_fallback_dequantizes_only_experts_with_rows(monkeypatch):
    w, scale = fp8(6, 2 * 96, 64, seed=4), scales(6, segments=2, rows=2 * 96, cols=64, seed=5)
    x, ends = bf16(7, 64, seed=6), torch.tensor([0, 3, 3, 3, 7, 7])  # experts 1 and 4 receive rows
    dequantized = []
    real = fp8_kernels.dequantize
    monkeypatch.setattr(fp8_kernels, "dequantize", lambda *a: dequantized.append(a[0].shape[0]) or real(*a))
    out = kernels.fp8_grouped_linear(x, w, scale, ends)
    assert dequantized == [2] and out.dtype == torch.bfloat16
    assert torch.equal(out, kernels.grouped_linear(x, real(w, scale, x.dtype), ends))
    expected = torch.cat([F.linear(x[:3], real(w[1], scale[1], x.dtype)),
                          F.linear(x[3:], real(w[4], scale[4], x.dtype))])
    torch.testing.assert_close(out, expected, atol=0.02, rtol=0.01)  # one bf16 rounding apart at most


def test_the_cpu_never_takes_the_cuda_path(monkeypatch):
    def fail(*args):
        raise AssertionError("CUDA path taken on CPU")

    monkeypatch.setattr(fp8_kernels, "cuda_fp8_linear", fail)
    monkeypatch.setattr(fp8_kernels, "cuda_block_fp8_applies", fail)
    w, scale = fp8(128, 128, seed=7), scales(segments=1, rows=128, cols=128, seed=8)
    kernels.fp8_linear(bf16(3, 128, seed=9), w, scale)


def test_the_cuda_path_quantizes_activations_per_token_and_128_columns():
    x = torch.randn(5, 256, generator=gen(10)) * torch.tensor([1.0, 1e-3, 1e3, 0.0, 7.0]).unsqueeze(1)
    q, s = fp8_kernels.quantize_1x128(x.to(torch.bfloat16))
    assert q.dtype == FP8_DTYPE and s.shape == (5, 2) and not q.float().isnan().any()
    back, xf = q.float().view(5, 2, 128) * s.unsqueeze(-1), x.to(torch.bfloat16).float().view(5, 2, 128)
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal steps of 2^-9 (times the group's scale)
    assert ((back - xf).abs() <= xf.abs() / 16 + s.unsqueeze(-1) * 2.0**-10).all()


def test_only_fp8_cpu_weights_with_whole_64_row_groups_and_bf16_activations_are_packed():
    w, scale = fp8(128, 128, seed=11), scales(segments=1, rows=128, cols=128, seed=12)
    assert kernels.pack_fp8(w, scale, torch.float32) is None  # float32 activations take the fallback
    n96 = fp8(96, 128, seed=13), scales(segments=1, rows=96, cols=128, seed=14)
    assert kernels.pack_fp8(*n96, torch.bfloat16) is None  # 96 rows: not whole 64-row groups
    two_96 = fp8(2, 2 * 96, 128, seed=15)  # N = 192 is whole 64-row groups, but a group would straddle the segments
    assert kernels.pack_fp8(two_96, scales(2, segments=2, rows=192, cols=128, seed=16), torch.bfloat16) is None
    packed = kernels.pack_fp8(w, scale, torch.bfloat16)
    assert (packed is not None) == (kernels.cpu_has_avx512_bf16() and kernels.cpu_has_avx512_vbmi())


def test_the_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("S1SERVE_CPU_KERNELS", "0")
    for cached in (kernels.bf16_kernels, kernels.fp8_kernels):
        cached.cache_clear()
    try:
        w, scale = fp8(128, 128, seed=17), scales(segments=1, rows=128, cols=128, seed=18)
        assert kernels.pack_fp8(w, scale, torch.bfloat16) is None
    finally:
        monkeypatch.undo()
        for cached in (kernels.bf16_kernels, kernels.fp8_kernels):
            cached.cache_clear()


class Fp8Experts(nn.Module):
    packable_fp8_weights = (("w13", "w13_scale"), ("proj.weight", "proj.weight_scale"))

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.w13 = nn.Parameter(fp8(2, rows, 128, seed=19), requires_grad=False)
        self.w13_scale = nn.Parameter(scales(2, segments=2, rows=rows, cols=128, seed=20), requires_grad=False)
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(fp8(rows, 128, seed=21), requires_grad=False)
        self.proj.weight_scale = nn.Parameter(scales(segments=1, rows=rows, cols=128, seed=22), requires_grad=False)


@needs_kernels
def test_pack_weights_replaces_weight_and_scale_where_the_kernel_applies():
    model = Fp8Experts(256)
    kernels.pack_weights(model, torch.bfloat16)
    for weight, scale in ((model.w13, model.w13_scale), (model.proj.weight, model.proj.weight_scale)):
        assert isinstance(weight, nn.Parameter) and isinstance(scale, nn.Parameter)
        assert kernels.is_fp8_packed(weight) and not weight.requires_grad and scale.dtype == torch.float32
    assert model.w13.shape == (2, 4, 64, 128) and model.w13_scale.shape == (2, 4, 1)
    assert model.proj.weight.shape == (4, 64, 128) and model.proj.weight_scale.shape == (4, 1)
    kernels.pack_weights(model, torch.bfloat16)  # a second call leaves packed weights as they are
    assert model.w13.shape == (2, 4, 64, 128)
    float32 = Fp8Experts(256)
    kernels.pack_weights(float32, torch.float32)
    assert float32.w13.dtype == FP8_DTYPE and float32.proj.weight.dtype == FP8_DTYPE
    straddling = Fp8Experts(2 * 96)  # gate and up segments of 96 rows: 64-row groups would straddle them
    kernels.pack_weights(straddling, torch.bfloat16)
    assert straddling.w13.dtype == FP8_DTYPE and kernels.is_fp8_packed(straddling.proj.weight)


@needs_kernels
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 6, 7, 13, 20, 64])
@pytest.mark.parametrize("n, k", [(128, 256), (320, 320), (192, 320), (64, 66)])
def test_the_kernel_is_bitwise_the_bf16_kernel_on_dequantized_weights(rows, n, k):
    w, scale = fp8(n, k, seed=n + k), scales(segments=1, rows=n, cols=k, seed=rows)
    packed, packed_scale = kernels.pack_fp8(w, scale, torch.bfloat16)
    assert kernels.is_fp8_packed(packed) and packed.shape == (n // 64, k // 2, 128)
    reference = bf16_kernel_reference(w, scale)
    x = bf16(rows, k, seed=rows + 1)
    out = kernels.fp8_linear(x, packed, packed_scale, torch.float32)
    assert out.shape == (rows, n) and torch.equal(out, kernels.linear(x, reference, torch.float32))
    assert torch.equal(kernels.fp8_linear(x, packed, packed_scale), kernels.linear(x, reference))


@needs_kernels
@pytest.mark.parametrize("code_scale", [0.37, -2.5, 2.0**-100, 3e-39, 1.0, 1e30, 1 + 2.0**-7 + 2.0**-8])
def test_every_code_decodes_to_dequantize_exactly(code_scale):
    """x = identity picks each weight out on its own: signs, zeros, subnormals, any scale (finite products), ties
    (1.0 * (1 + 2^-7 + 2^-8) is halfway between two bf16 values: to even rounds it up)."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # the 254 codes that are not NaN
    w = torch.stack([codes.roll(i) for i in range(64)]).view(FP8_DTYPE)  # [64, 254]: every code in every column
    scale = torch.full((1, 1, 2), code_scale)
    packed = kernels.pack_fp8(w, scale, torch.bfloat16)
    out = kernels.fp8_linear(torch.eye(254, dtype=torch.bfloat16), *packed, torch.float32).T
    expected = dequantize(w, scale, torch.bfloat16).float()
    # vdpbf16ps takes subnormal bf16 inputs as zero, in the bf16 kernel too
    assert torch.equal(out, expected.masked_fill(expected.abs() < torch.finfo(torch.bfloat16).tiny, 0))
    x = bf16(9, 254, seed=23)
    assert torch.equal(kernels.fp8_linear(x, *packed, torch.float32),
                       kernels.linear(x, bf16_kernel_reference(w, scale), torch.float32))


@needs_kernels
def test_nan_codes_give_nan():
    w = torch.zeros(128, 128, dtype=torch.uint8)
    w[torch.arange(0, 128, 2), torch.arange(0, 128, 2)] = torch.tensor(NAN_CODES * 32, dtype=torch.uint8)
    packed = kernels.pack_fp8(w.view(FP8_DTYPE), torch.ones(1, 1, 1), torch.bfloat16)
    out = kernels.fp8_linear(torch.ones(1, 128, dtype=torch.bfloat16), *packed, torch.float32)[0]
    assert torch.equal(out.isnan(), torch.arange(128) % 2 == 0)


@needs_kernels
def test_each_row_is_the_same_whatever_else_is_in_the_batch():
    w, scale = fp8(256, 384, seed=24), scales(segments=1, rows=256, cols=384, seed=25)
    packed = kernels.pack_fp8(w, scale, torch.bfloat16)
    x = bf16(70, 384, seed=26)  # past the row count where each block is decoded once for all rows
    batched = kernels.fp8_linear(x, *packed, torch.float32)
    for i in range(0, 70, 3):
        assert torch.equal(batched[i], kernels.fp8_linear(x[i : i + 1], *packed, torch.float32)[0])
    assert torch.equal(batched[5:21], kernels.fp8_linear(x[5:21], *packed, torch.float32))
    wide = bf16(2, 3, 512, seed=27)[..., :384]  # leading dims and strided rows
    assert torch.equal(kernels.fp8_linear(wide, *packed), kernels.fp8_linear(wide.contiguous(), *packed))


@needs_kernels
@pytest.mark.parametrize("half, k", [(192, 320), (128, 256), (64, 130)])
def test_grouped_experts_with_segments_are_bitwise_the_bf16_kernel(half, k):
    experts = 5
    w, scale = fp8(experts, 2 * half, k, seed=half), scales(experts, segments=2, rows=2 * half, cols=k, seed=k)
    packed = kernels.pack_fp8(w, scale, torch.bfloat16)
    assert packed[0].shape == (experts, 2 * half // 64, k // 2, 128)
    assert packed[1].shape == (experts, 2 * half // 64, math.ceil(k / 128))
    reference = bf16_kernel_reference(w, scale)
    x = bf16(80, k, seed=28)
    for ends in ([3, 3, 4, 11, 11], [0, 1, 1, 80, 80], [60, 62, 70, 70, 80], [0, 0, 0, 0, 0]):
        ends = torch.tensor(ends)
        rows = int(ends[-1])
        out = kernels.fp8_grouped_linear(x[:rows], *packed, ends)
        assert out.dtype == torch.bfloat16 and torch.equal(out, kernels.grouped_linear(x[:rows], reference, ends))
    alone = kernels.fp8_grouped_linear(x[3:4], *packed, torch.tensor([0, 0, 1, 1, 1]))
    assert torch.equal(alone[0], kernels.fp8_grouped_linear(x[:11], *packed, torch.tensor([3, 3, 4, 11, 11]))[3])
