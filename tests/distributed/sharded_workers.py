"""Running the sharded model in real processes: spawn a gloo world on loopback, run a plan of steps per rank.

`run_world(n, fn, *args)` starts n processes (torch.multiprocessing, spawn), joins them in one gloo group over
tcp on a free loopback port, calls fn(rank, n, *args) in each and returns the results in rank order; a rank's
exception comes back as a test failure carrying its traceback, and a hung world is killed after a timeout.

A plan is a list of sequences, each (prompt ids, decode steps). Step 0 prefills every sequence of a rank in one
batch; step s > 0 decodes one token (the greedy argmax of the previous step) for each sequence with at least s
decode steps. Every rank runs every sequence when tokens are replicated; under DP attention a shape names each
sequence's owner rank, and a rank with nothing to run in a step calls `model.idle_step()`.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from s1serve.engine.model_runner import ModelRunner, StepSequence
from s1serve.models.registry import load_model
from s1serve.parallel.context import ParallelContext

BLOCK_SIZE = 16
WORLD_TIMEOUT_S = 60


@dataclass(frozen=True)
class PlannedSequence:
    prompt: list[int]
    decode_steps: int


@dataclass(frozen=True)
class Shape:
    tp: int
    ep: int
    dp: int = 1
    owners: tuple[int, ...] = ()  # under dp > 1: the rank running each sequence of the plan


# {(sequence index, step): float32 logits [vocab]} of the sequences a rank ran.
PlanOutput = dict[tuple[int, int], np.ndarray]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=WORLD_TIMEOUT_S),
        )
        results.put((rank, True, fn(rank, world, *args)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure goes back to the test with its traceback
        results.put((rank, False, traceback.format_exc()))
    results.close()
    results.join_thread()
    os._exit(0)  # the result is flushed; a normal interpreter exit with torch loaded takes seconds here


def run_world(world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """fn(rank, world, *args) in `world` gloo-connected processes; their return values in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, ok, value = results.get(timeout=WORLD_TIMEOUT_S)
            if not ok:
                raise AssertionError(f"rank {rank} of {world} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


def parallel_context(rank: int, shape: Shape) -> ParallelContext:
    """The context of `rank` in a world where tp and ep are each 1 or the whole world (ParallelConfig shapes)."""
    world = dist.group.WORLD
    return ParallelContext(
        tp_rank=rank if shape.tp > 1 else 0, tp_size=shape.tp, tp_group=world if shape.tp > 1 else None,
        ep_rank=rank if shape.ep > 1 else 0, ep_size=shape.ep, ep_group=world if shape.ep > 1 else None,
        tokens_replicated=shape.dp == 1,
    )


def run_plan(model: torch.nn.Module, plan: list[PlannedSequence], mine: list[int]) -> PlanOutput:
    """Runs the sequences `mine` of `plan` step by step on a fresh ModelRunner; idle_step when none is active."""
    per_seq = -(-max(len(s.prompt) + s.decode_steps for s in plan) // BLOCK_SIZE)
    runner = ModelRunner(model, per_seq * len(plan), BLOCK_SIZE)
    tokens = {i: list(plan[i].prompt) for i in mine}
    out: PlanOutput = {}
    for step in range(max(s.decode_steps for s in plan) + 1):
        active = [i for i in mine if plan[i].decode_steps >= step]
        if not active:
            model.idle_step()
            continue
        seqs = [
            StepSequence(
                tokens[i] if step == 0 else tokens[i][-1:],
                0 if step == 0 else len(tokens[i]) - 1,
                list(range(i * per_seq, (i + 1) * per_seq)),
            )
            for i in active
        ]
        logits = runner.last_logits(seqs)
        for row, i in enumerate(active):
            out[(i, step)] = logits[row].numpy().copy()
            tokens[i].append(int(logits[row].argmax()))
    return out


def sharded_plan_worker(
    rank: int, world: int, checkpoint: Path, plan: list[PlannedSequence], shapes: dict[str, Shape]
) -> dict[str, PlanOutput]:
    """For each named shape: load this rank's shard (float32), run its part of the plan."""
    results = {}
    for name, shape in shapes.items():
        model = load_model(checkpoint, "float32", "cpu", parallel=parallel_context(rank, shape))
        mine = [i for i in range(len(plan)) if shape.dp == 1 or shape.owners[i] == rank]
        results[name] = run_plan(model, plan, mine)
    return results
