"""The CPU attention kernel over the paged cache (`fused_ops.cpp`, paged_attention), as AttentionBatch routes tokens
to it (positions below its bound): close to the batched-matmul path, each row the same whatever else is in the step,
and a sequence's tokens the same however its prompt is cut into chunks, also across the bound."""

from __future__ import annotations

import pytest
import torch

from s1serve.layers import kernels
from s1serve.layers.attention import AttentionBatch, kernel_context, paged_attention

pytestmark = pytest.mark.skipif(not kernels.cpu_has_avx512_bf16(), reason="CPU without AVX512-BF16: no kernel")

BLOCK_SIZE, KV_HEADS, HEADS, HEAD_DIM, NUM_BLOCKS = 16, 2, 8, 64, 96


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def tables_for(lengths: list[int]) -> list[list[int]]:
    tables, next_block = [], 0
    for n in lengths:
        blocks = -(-n // BLOCK_SIZE)
        tables.append(list(range(next_block, next_block + blocks))[::-1])  # out of order: read through the table
        next_block += blocks
    return tables


class Step:
    """One layer's cache and the keys / values / queries of every position of each sequence."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths
        self.tables = tables_for(lengths)
        self.cache = (torch.zeros(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM, dtype=torch.bfloat16),
                      torch.zeros(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM, dtype=torch.bfloat16))
        self.q = [bf16(n, HEADS, HEAD_DIM, seed=10 + i) for i, n in enumerate(lengths)]
        self.k = [bf16(n, KV_HEADS, HEAD_DIM, seed=20 + i) for i, n in enumerate(lengths)]
        self.v = [bf16(n, KV_HEADS, HEAD_DIM, seed=30 + i) for i, n in enumerate(lengths)]

    def run(self, chunks: list[tuple[int, int, int]], kernel_below: int) -> torch.Tensor:
        """Attends (sequence, start, stop) chunks in one step; returns their rows in that order."""
        batch = AttentionBatch.build([b - a for _, a, b in chunks], [a for _, a, _ in chunks],
                                     [self.tables[i] for i, _, _ in chunks], BLOCK_SIZE, "cpu", kernel_below)
        q, k, v = (torch.cat([part[i][a:b] for i, a, b in chunks]) for part in (self.q, self.k, self.v))
        return paged_attention(q, k, v, self.cache, batch, HEAD_DIM**-0.5)


def test_the_kernel_takes_bf16_cpu_caches_only():
    assert kernel_context(torch.bfloat16, "cpu", 64) > 0
    assert kernel_context(torch.float32, "cpu", 64) == 0
    assert kernel_context(torch.bfloat16, "cpu", 48) == 0  # not whole steps of 32


def test_the_kernel_is_close_to_the_batched_matmuls():
    step = Step([70, 5, 33])
    whole = [(0, 0, 70), (1, 0, 5), (2, 0, 33)]
    kernel = step.run(whole, kernel_below=1 << 20)
    matmuls = step.run(whole, kernel_below=0)
    torch.testing.assert_close(kernel.float(), matmuls.float(), atol=3e-2, rtol=2e-2)  # bf16 roundings apart


def test_each_row_is_the_same_whatever_else_is_in_the_step():
    step = Step([40, 64])
    step.run([(0, 0, 40), (1, 0, 64)], kernel_below=1 << 20)  # the cache holds every key
    together = step.run([(0, 39, 40), (1, 10, 64)], kernel_below=1 << 20)
    alone = torch.cat([step.run([(0, 39, 40)], 1 << 20), step.run([(1, 10, 64)], 1 << 20)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("bound", [0, 30, 1 << 20])  # none, across the prompt, all: each token's path is its own
def test_a_prompt_gives_the_same_rows_however_it_is_chunked(bound):
    step = Step([90, 20])
    whole = torch.cat([step.run([(0, 0, 90)], bound), step.run([(1, 0, 20)], bound)])
    chunked = torch.cat([step.run([(0, 0, 17), (1, 0, 3)], bound), step.run([(0, 17, 50), (1, 3, 20)], bound),
                         step.run([(0, 50, 89)], bound), step.run([(0, 89, 90)], bound)])
    order = list(range(17)) + list(range(90, 93)) + list(range(17, 50)) + list(range(93, 110)) + list(range(50, 90))
    assert torch.equal(chunked, whole[order])
