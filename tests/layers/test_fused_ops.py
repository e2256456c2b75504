"""The fused per-layer CPU ops (`s1serve/layers/kernels/fused_ops.cpp`) against the PyTorch ops they replace: bitwise
where they replicate PyTorch's bf16 roundings (rotary, SwiGLU's product, greedy), RMSNorm within one bf16 step, the
same choice where the router picks (ties aside), and the whole MoE layer within one bf16 rounding of the PyTorch
path; each row alone."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from s1serve.layers import kernels
from s1serve.layers.moe import select_experts
from s1serve.layers.norm import RMSNorm
from s1serve.layers.rotary import apply_rotary, rotate_half
from s1serve.models.registry import load_model

pytestmark = pytest.mark.skipif(not kernels.cpu_has_avx512_bf16(), reason="CPU without AVX512-BF16: no fused ops")


def bf16(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


@pytest.fixture
def ops():
    return kernels.bf16_kernels()


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_rms_norm_is_the_pytorch_norm_within_one_bf16_step(ops, scale):
    x, weight = bf16(50, 7, 64, seed=1, scale=scale), bf16(64, seed=2) + 1
    expected = weight * F.rms_norm(x.float(), (64,), eps=1e-6).to(torch.bfloat16)
    out = ops.rms_norm(x, weight, 1e-6)
    differ = out != expected  # the float32 sum of squares runs in another order than PyTorch's
    assert differ.float().mean() < 1e-3
    step = expected.float().abs() * 2**-7  # one bf16 step (7 stored mantissa bits), or less
    assert ((out.float() - expected.float()).abs() <= step)[differ].all()
    assert torch.equal(ops.rms_norm(x[3:4], weight, 1e-6), out[3:4])  # a row alone


def test_routing_leaves_its_input_alone(ops):
    logits = torch.randn(5, 64)
    before = logits.clone()
    ops.select_experts(logits, 8, 1, True)
    assert torch.equal(logits, before)


def test_the_norm_layer_takes_the_fused_op_for_bf16_only(ops, monkeypatch):
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    calls = []
    monkeypatch.setattr(kernels, "fused_ops", lambda x: calls.append(x.dtype) or (ops if x.dtype == torch.bfloat16
                                                                                  else None))
    norm(bf16(3, 64, seed=3))
    norm.float()(torch.randn(3, 64))
    assert calls == [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_rotary_is_bitwise_the_pytorch_rotation(groups):
    x = bf16(40, 24, 64, seed=4)[:, 4:20]  # 16 heads, rows strided as a q_proj view is
    cos, sin = bf16(40, groups, 64, seed=5), bf16(40, groups, 64, seed=6)
    heads_cos = cos.repeat_interleave(16 // groups, dim=1)
    heads_sin = sin.repeat_interleave(16 // groups, dim=1)
    assert torch.equal(apply_rotary(x, cos, sin), x * heads_cos + rotate_half(x) * heads_sin)


@pytest.mark.parametrize("groups", [1, 2])
def test_the_attention_prologue_is_bitwise_norms_rotary_and_the_cache_write(ops, groups):
    tokens, heads, kv_heads, dim, blocks, block_size = 5, 8, 2, 64, 6, 4
    qkv = bf16(tokens, (heads + 2 * kv_heads) * dim, seed=20, scale=3.0)
    q_norm, k_norm = bf16(dim, seed=21) + 1, bf16(dim, seed=22) + 1
    cos, sin = bf16(tokens, groups, dim, seed=23), bf16(tokens, groups, dim, seed=24)
    slots = torch.tensor([17, 3, 22, 0, 9])
    k_cache, v_cache = (bf16(kv_heads, blocks, block_size, dim, seed=s) for s in (25, 26))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    q = ops.qk_norm_rotary_cache(qkv, heads, kv_heads, q_norm, 1e-6, k_norm, 1e-5, cos, sin, k_cache, v_cache, slots)

    q_part, k_part, v_part = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    step_q = ops.rotary(ops.rms_norm(q_part.reshape(tokens, heads, dim), q_norm, 1e-6), cos, sin)
    step_k = ops.rotary(ops.rms_norm(k_part.reshape(tokens, kv_heads, dim), k_norm, 1e-5), cos, sin)
    expected_k.view(kv_heads, -1, dim).index_copy_(1, slots, step_k.transpose(0, 1))
    expected_v.view(kv_heads, -1, dim).index_copy_(1, slots, v_part.reshape(tokens, kv_heads, dim).transpose(0, 1))
    assert torch.equal(q, step_q)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)  # the other slots untouched
    with pytest.raises(RuntimeError, match="slot 24 is outside the cache"):
        ops.qk_norm_rotary_cache(qkv, heads, kv_heads, q_norm, 1e-6, k_norm, 1e-5, cos, sin, k_cache, v_cache,
                                 torch.tensor([0, 1, 2, 3, 24]))


def test_silu_mul_is_bitwise_pytorchs_swiglu_product(ops):
    h = torch.cat([bf16(64, 2 * 389, seed=7, scale=s) for s in (0.1, 1.0, 30.0)])
    edge = torch.tensor([-100.0, -1e30, float("inf"), float("-inf"), float("nan"), 0.0, 88.0, -88.0, 1e30, -200.0])
    h[0, : len(edge)] = edge.to(torch.bfloat16)
    gate, up = h[:, :389], h[:, 389:]
    torch.testing.assert_close(ops.silu_mul(h), F.silu(gate) * up, equal_nan=True, atol=0, rtol=0)  # bitwise


@pytest.mark.parametrize("groups", [1, 4])
def test_routing_chooses_as_select_experts(ops, groups):
    logits = torch.randn(300, 64, generator=torch.Generator().manual_seed(8))  # float32: no ties
    ids, weights = ops.select_experts(logits, 8, groups, True)
    ref_ids, ref_weights = select_experts(logits, 8, groups, True)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), atol=1e-6, rtol=1e-5)
    if groups > 1:  # exactly k/G experts inside each group of 16
        assert ((ids // 16).sort(-1).values == torch.arange(4).repeat_interleave(2)).all()


def test_sort_rows_orders_the_held_experts_rows_stably_and_drops_the_rest(ops):
    ids = torch.randint(0, 64, (50, 8), generator=torch.Generator().manual_seed(9))
    weights = torch.rand(50, 8, generator=torch.Generator().manual_seed(10))
    token_of_row, row_weight, ends = ops.sort_rows(ids, weights, 16, 16)  # an EP rank holding experts 16..31
    pairs = [(int(e) - 16, t, w) for t in range(50) for e, w in zip(ids[t], weights[t].tolist()) if 16 <= e < 32]
    pairs.sort(key=lambda p: p[0])  # stable: token order within an expert
    assert token_of_row.tolist() == [t for _, t, _ in pairs]
    assert row_weight.tolist() == pytest.approx([w for _, _, w in pairs])
    counts = torch.bincount(torch.tensor([e for e, _, _ in pairs]), minlength=16)
    assert ends.tolist() == torch.cumsum(counts, 0).tolist()


def test_combine_sums_each_tokens_weighted_rows(ops):
    rows, token_of_row = bf16(30, 64, seed=11), torch.randint(0, 7, (30,), generator=torch.Generator().manual_seed(12))
    row_weight = torch.rand(30, generator=torch.Generator().manual_seed(13))
    out = ops.combine(rows, token_of_row, row_weight, 8)  # token 7 receives no rows: zeros
    expected = torch.zeros(8, 64, dtype=torch.float64).index_add_(
        0, token_of_row, rows.double() * row_weight.to(torch.bfloat16).double()[:, None])
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=8e-3)  # one bf16 rounding
    assert out[7].abs().sum() == 0


@pytest.mark.parametrize("width", [64, 1000])  # whole 16-lane steps, and a masked tail
def test_combine_is_each_tokens_float32_sum_in_row_order_bitwise(ops, width):
    generator = torch.Generator().manual_seed(15)
    rows = bf16(300, width, seed=16)
    token_of_row = torch.randint(0, 40, (300,), generator=generator)
    row_weight = torch.rand(300, generator=generator)
    sums = torch.zeros(41, width)  # the reference: product rounded to float32, then the sum, rows in order
    for r in range(300):
        t = int(token_of_row[r])
        sums[t] = sums[t] + row_weight[r].to(torch.bfloat16).float() * rows[r].float()
    out = ops.combine(rows, token_of_row, row_weight, 41)
    assert torch.equal(out, sums.to(torch.bfloat16))
    mine = token_of_row == 5
    alone = ops.combine(rows[mine], torch.zeros(int(mine.sum()), dtype=torch.long), row_weight[mine], 1)
    assert torch.equal(alone, out[5:6])  # a token alone


@pytest.mark.usefixtures("kernel_path")  # on AVX-512 and on AMX (conftest.py)
def test_grouped_swiglu_is_bitwise_the_gate_up_matmul_then_the_product(ops):
    experts, hidden, intermediate = 4, 96, 128
    w13 = kernels.pack(bf16(experts, 2 * intermediate, hidden, seed=30, scale=0.2))
    x = bf16(45, hidden, seed=31)
    for ends in ([10, 10, 27, 45], [0, 1, 2, 45], [45, 45, 45, 45]):
        ends = torch.tensor(ends)
        expected = ops.silu_mul(kernels.grouped_linear(x, w13, ends))
        assert torch.equal(ops.grouped_swiglu(x, w13, ends), expected)
    assert ops.grouped_swiglu(x[:0], w13, torch.zeros(4, dtype=torch.long)).shape == (0, intermediate)
    with pytest.raises(RuntimeError, match="ends must be non-decreasing"):
        ops.grouped_swiglu(x, w13, torch.tensor([5, 3, 45, 45]))


@pytest.fixture(scope="module")
def bf16_model(tiny_checkpoint):
    from s1serve.engine.model_runner import ModelRunner

    model = load_model(tiny_checkpoint, torch.bfloat16)
    ModelRunner(model, num_blocks=4, block_size=16)  # packs the weights as the engine does
    return model


def moe_outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    layer = next(layer for layer in model.layers if layer.is_moe)
    x = bf16(33, layer.mlp.hidden_size, seed=14)
    with torch.inference_mode():
        return layer.mlp(x), torch.cat([layer.mlp(x[i : i + 1]) for i in range(x.shape[0])])


def test_the_model_gives_the_same_hidden_states_with_and_without_the_attention_prologue(bf16_model, monkeypatch):
    from s1serve.engine.kv_cache import allocate_kv_cache
    from s1serve.layers.attention import Attention, AttentionBatch

    cfg = bf16_model.config.text
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(15))
    batch = AttentionBatch.build([7, 5], [0, 0], [[0, 1], [2]], 16, "cpu", kernel_below=64)
    positions = torch.cat([torch.arange(7), torch.arange(5)])

    def hidden_and_cache() -> tuple[torch.Tensor, list]:
        caches = allocate_kv_cache(cfg, 4, 16, torch.bfloat16, "cpu", bf16_model.num_local_kv_heads)
        with torch.inference_mode():
            return bf16_model(ids, positions, caches, batch), caches

    ops = kernels.bf16_kernels()
    real, calls = ops.attention_block, []
    monkeypatch.setattr(ops, "attention_block", lambda *args: calls.append(1) or real(*args))
    block, block_caches = hidden_and_cache()  # every token below kernel_below: one call per layer
    assert len(calls) == cfg.num_hidden_layers
    monkeypatch.setattr(Attention, "_block_applies", lambda *_: False)
    fused, fused_caches = hidden_and_cache()  # projections, then the prologue: two calls
    monkeypatch.setattr(Attention, "_fused_prologue_applies", lambda *_: False)
    steps, step_caches = hidden_and_cache()
    assert len(calls) == cfg.num_hidden_layers
    assert torch.equal(block, steps) and torch.equal(fused, steps)
    for (k, v), (k2, v2), (k3, v3) in zip(block_caches, fused_caches, step_caches):
        assert torch.equal(k, k3) and torch.equal(v, v3) and torch.equal(k2, k3) and torch.equal(v2, v3)


def test_attention_takes_one_call_only_when_every_token_attends_through_the_kernel(bf16_model):
    from s1serve.layers.attention import AttentionBatch

    attention = bf16_model.layers[0].self_attn
    all_in_kernel = AttentionBatch.build([3, 1], [0, 9], [[0], [1]], 16, "cpu", kernel_below=64)
    past_kernel = AttentionBatch.build([3, 1], [0, 70], [[0], [1, 2, 3, 4, 5]], 16, "cpu", kernel_below=64)
    no_kernel = AttentionBatch.build([3, 1], [0, 9], [[0], [1]], 16, "cpu", kernel_below=0)
    assert attention._block_applies(all_in_kernel, 4)
    assert not attention._block_applies(past_kernel, 4)  # the second sequence's token sits at 70
    assert not attention._block_applies(no_kernel, 4)


def test_the_moe_layer_matches_its_pytorch_path_and_each_token_alone(bf16_model, monkeypatch):
    from s1serve.layers.moe import SparseMoE

    ops = kernels.bf16_kernels()
    real, calls = ops.moe_block, []
    monkeypatch.setattr(ops, "moe_block", lambda *args: calls.append(1) or real(*args))
    block, alone = moe_outputs(bf16_model)
    assert calls and torch.equal(block, alone)  # row-invariant
    monkeypatch.setattr(SparseMoE, "_block_applies", lambda self: False)
    calls.clear()
    fused, _ = moe_outputs(bf16_model)  # the router, then _local_experts' fused steps one by one
    assert not calls and torch.equal(fused, block)
    monkeypatch.setattr(kernels, "fused_ops", lambda x: None)
    pytorch, _ = moe_outputs(bf16_model)
    torch.testing.assert_close(fused.float(), pytorch.float(), atol=2e-2, rtol=2e-2)  # bf16 roundings of the sum


def test_a_moe_layer_with_whole_blocks_takes_grouped_swiglu_bitwise(ops, tmp_path_factory, monkeypatch):
    from s1serve.checkpoint.tiny import write_tiny_checkpoint
    from s1serve.engine.model_runner import ModelRunner
    from s1serve.layers.moe import SparseMoE

    model = load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("edge"), preset="edge", seed=2), torch.bfloat16)
    ModelRunner(model, num_blocks=4, block_size=16)
    assert model.layers[0].mlp.intermediate % 64 == 0  # gate and up in whole 64-column blocks
    block, alone = moe_outputs(model)  # moe_block: grouped_swiglu inside it
    assert torch.equal(block, alone)
    monkeypatch.setattr(SparseMoE, "_block_applies", lambda self: False)
    real, calls = ops.grouped_swiglu, []
    monkeypatch.setattr(ops, "grouped_swiglu", lambda *args: calls.append(1) or real(*args))
    fused, _ = moe_outputs(model)
    assert calls and torch.equal(fused, block)
    monkeypatch.setattr(SparseMoE, "swiglu", lambda self, f, rows, ends: f.silu_mul(self.grouped(rows, "w13", ends)))
    assert torch.equal(moe_outputs(model)[0], fused)
    mlp = model.layers[0].mlp
    x = bf16(33, mlp.hidden_size, seed=14)
    args = (mlp.gate.weight, mlp.w13, mlp.w2, mlp.top_k, mlp.num_groups, mlp.renormalize, mlp.experts.start)
    with torch.inference_mode():  # moe_block's own choice: the two calls below 16 rows an expert (0: never one)
        assert torch.equal(ops.moe_block(x, *args, 0), block) and torch.equal(ops.moe_block(x, *args, 1), block)



@pytest.mark.parametrize("held", [(0, 64), (16, 32)])  # all experts held; an EP rank's share
@pytest.mark.usefixtures("kernel_path")
def test_moe_block_is_bitwise_the_router_then_the_held_experts_steps(ops, held):
    first, count = held
    experts, hidden, intermediate, tokens, top_k = 64, 128, 64, 21, 8
    gate = kernels.pack(bf16(experts, hidden, seed=40))  # 64 experts: the router's weight packed too
    w13 = kernels.pack(bf16(count, 2 * intermediate, hidden, seed=41, scale=0.2))
    w2 = kernels.pack(bf16(count, hidden, intermediate, seed=42, scale=0.2))
    x = bf16(tokens, hidden, seed=43)
    ids, weights = ops.select_experts(kernels.linear(x, gate), top_k, 4, True)
    token_of_row, row_weight, ends = ops.sort_rows(ids, weights, first, count)
    hidden_rows = ops.silu_mul(kernels.grouped_linear(x.index_select(0, token_of_row), w13, ends))
    expected = ops.combine(kernels.grouped_linear(hidden_rows, w2, ends), token_of_row, row_weight, tokens)
    for swiglu_min_rows in (0, 1):  # the two calls, then grouped_swiglu: bitwise the same
        assert torch.equal(ops.moe_block(x, gate, w13, w2, top_k, 4, True, first, swiglu_min_rows), expected)
