"""Process groups: one torch.distributed world per deployment, and what each rank's layers get from it.

`init_distributed` joins the world over tcp://HOST:PORT (rank 0 hosts the rendezvous store): gloo on CPU, NCCL on
CUDA, plus a gloo "control" group for Python objects and small CPU flags (step broadcasts, start-up agreement,
lock-step ticks), which is the world itself on CPU. The layers' groups follow ParallelConfig's shapes: with dp == 1
tp and ep are each 1 or the whole world, under dp > 1 ep is the whole world (or 1: then there is no world at all,
each DP rank being an independent replica).

Every collective has a timeout (S1SERVE_DIST_TIMEOUT seconds, default 300), so a rank whose peer vanished without
closing its connections fails instead of hanging; a peer process that dies closes its sockets, and the ranks
waiting on it fail at once.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from s1serve.parallel.config import ParallelConfig
from s1serve.parallel.context import ParallelContext

TIMEOUT_ENV = "S1SERVE_DIST_TIMEOUT"


def collective_timeout() -> float:
    """Seconds a collective may wait for its peers."""
    return float(os.environ.get(TIMEOUT_ENV, 300))


def free_loopback_address() -> str:
    """127.0.0.1:PORT with a port free right now (the rendezvous of a one-node deployment)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def rank_device(device: str, parallel: ParallelConfig, rank: int) -> torch.device:
    """The device of a rank: on CUDA its node-local index (one device per rank) unless `device` names one."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and parallel.is_distributed:
        return torch.device("cuda", rank - parallel.local_ranks.start)
    return dev


def share_cpu(device: torch.device, parallel: ParallelConfig) -> None:
    """On CPU the node's cores are shared by its ranks; without this each would start one thread per core."""
    if device.type == "cpu" and parallel.ranks_per_node > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel.ranks_per_node))


@dataclass(frozen=True)
class World:
    """One rank's membership: its rank, the world's size, the groups its layers use, and the control group."""

    rank: int
    size: int
    device: torch.device
    parallel: ParallelContext
    control: Any  # a gloo ProcessGroup for objects and CPU tensors
    threads_before: int  # torch's CPU threads before joining (restored on leaving)


def init_distributed(parallel: ParallelConfig, rank: int, device: str, address: str) -> World:
    """Joins the world of `parallel` as `rank`, meeting the others at `address` (HOST:PORT)."""
    dev = rank_device(device, parallel, rank)
    threads = torch.get_num_threads()
    share_cpu(dev, parallel)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=collective_timeout())
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://{address}", rank=rank, world_size=parallel.world_size, timeout=timeout
    )
    control = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return World(rank, parallel.world_size, dev, parallel_context(parallel, rank), control, threads)


def parallel_context(parallel: ParallelConfig, rank: int) -> ParallelContext:
    """What the layers of `rank` split, and over which group (the world, which must be initialised)."""
    world = dist.group.WORLD
    if parallel.dp > 1:  # ep == dp: experts over every rank, each bringing its own tokens
        return ParallelContext(ep_rank=rank, ep_size=parallel.ep, ep_group=world, tokens_replicated=False)
    return ParallelContext(
        tp_rank=rank if parallel.tp > 1 else 0,
        tp_size=parallel.tp,
        tp_group=world if parallel.tp > 1 else None,
        ep_rank=rank if parallel.ep > 1 else 0,
        ep_size=parallel.ep,
        ep_group=world if parallel.ep > 1 else None,
        tokens_replicated=True,
    )


def close_distributed(world: World) -> None:
    """Leaves the world (so that this process can join another one later)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    torch.set_num_threads(world.threads_before)
