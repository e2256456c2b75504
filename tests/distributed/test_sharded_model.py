"""The sharded model in real gloo processes gives the single-process logits: TP, EP, TP+EP and DP attention + EP.

One plan (three prompts of different lengths prefilled together, then greedy decode steps, one sequence
finishing early) runs on the tiny checkpoint in float32, through ModelRunner and its paged cache, once in this
process and once per parallel shape. Every shape of one world size runs in one spawned world (each rank loads
each shape's shard in turn), which keeps the cost of starting processes to one per world size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sharded_workers import PlannedSequence, PlanOutput, Shape, run_plan, run_world, sharded_plan_worker

from s1serve.config import load_model_config
from s1serve.models.registry import load_model

TOL = 2e-5  # float32: a few ulps of the largest logits (~12) after the collectives reorder sums
WORLD2 = {
    "tp2": Shape(tp=2, ep=1),
    "ep2": Shape(tp=1, ep=2),
    "tp2_ep2": Shape(tp=2, ep=2),
    # rank 0 runs A and B, rank 1 runs C, which ends after its first decode step: rank 1 then idles.
    "dp2_ep2": Shape(tp=1, ep=2, dp=2, owners=(0, 0, 1)),
    # rank 1 has no tokens in any step (prefill included): every one of its steps is idle_step.
    "dp2_ep2_idle_rank": Shape(tp=1, ep=2, dp=2, owners=(0, 0, 0)),
}
# 4 heads and 2 KV heads: under tp=4 each KV head (and its FoPE coefficients) is replicated on 2 ranks.
WORLD4 = {"tp4": Shape(tp=4, ep=1), "tp4_ep4": Shape(tp=4, ep=4)}


@pytest.fixture(scope="module")
def plan(tiny_checkpoint: Path) -> list[PlannedSequence]:
    gen = torch.Generator().manual_seed(3)
    vocab = load_model_config(tiny_checkpoint).text.vocab_size  # ids from all of it: every vocab-parallel shard
    lengths, steps = (7, 12, 4), (3, 3, 1)
    return [
        PlannedSequence(torch.randint(0, vocab, (n,), generator=gen).tolist(), k) for n, k in zip(lengths, steps)
    ]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path, plan: list[PlannedSequence]) -> PlanOutput:
    model = load_model(tiny_checkpoint, "float32", "cpu")
    return run_plan(model, plan, list(range(len(plan))))


@pytest.fixture(scope="module")
def world2(tiny_checkpoint: Path, plan: list[PlannedSequence]) -> list[dict[str, PlanOutput]]:
    return run_world(2, sharded_plan_worker, tiny_checkpoint, plan, WORLD2)


@pytest.fixture(scope="module")
def world4(tiny_checkpoint: Path, plan: list[PlannedSequence]) -> list[dict[str, PlanOutput]]:
    return run_world(4, sharded_plan_worker, tiny_checkpoint, plan, WORLD4)


def _check(shape: Shape, per_rank: list[PlanOutput], reference: PlanOutput) -> None:
    for rank, got in enumerate(per_rank):
        expected_keys = {k for k in reference if shape.dp == 1 or shape.owners[k[0]] == rank}
        assert set(got) == expected_keys, f"rank {rank} ran {sorted(got)}, expected {sorted(expected_keys)}"
        for key, logits in got.items():
            want = reference[key]
            err = float(np.abs(logits - want).max())
            assert err < TOL, f"rank {rank}, sequence {key[0]}, step {key[1]}: max |logit error| {err:.2e}"
            assert logits.argmax() == want.argmax(), f"rank {rank}, sequence {key[0]}, step {key[1]}: greedy id differs"


@pytest.mark.parametrize("name", list(WORLD2))
def test_two_ranks_match_single_process(name: str, world2: list[dict[str, PlanOutput]], reference: PlanOutput):
    _check(WORLD2[name], [rank[name] for rank in world2], reference)


@pytest.mark.parametrize("name", list(WORLD4))
def test_four_ranks_with_replicated_kv_heads_match_single_process(
    name: str, world4: list[dict[str, PlanOutput]], reference: PlanOutput
):
    _check(WORLD4[name], [rank[name] for rank in world4], reference)
