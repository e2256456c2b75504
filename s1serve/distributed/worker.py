"""What every rank runs: load its shard and agree with the others on the KV cache; followers then replay rank 0's
steps.

Start-up is one collective: each rank loads its shard (only its slices of the checkpoint) and contributes its
status to an all-gather: the KV blocks its memory allows, a LoadReport, or the error that stopped it. Then every
rank knows whether all could start (a failure is raised on the driver with the failing rank's message) and takes
the smallest block count, so that rank 0's block manager fits every rank's cache.

A follower (ranks 1..N-1 of a TP/EP engine; a local process, a process of a --headless node, or a Ray actor) then
loops: receive rank 0's next message over the control group and run the same ModelRunner call on its shard, so
that the forward's collectives meet. Messages: (method, args) for "execute" and "prompt_logits", HEARTBEAT (rank 0
is idle but alive), STOP. A follower whose receive fails (rank 0 is gone) exits with status 1.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from s1serve.distributed.groups import World, close_distributed, init_distributed
from s1serve.engine.config import EngineConfig
from s1serve.engine.model_runner import ModelRunner, kv_blocks_for
from s1serve.errors import S1ServeError
from s1serve.parallel.config import ParallelConfig

log = logging.getLogger("s1serve.worker")

HEARTBEAT = ("heartbeat", ())
STOP = None
FOLLOWED = frozenset({"execute", "prompt_logits"})  # the ModelRunner calls rank 0 sends
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to build its part (picklable: it travels to spawned processes and Ray actors)."""

    model_dir: Path
    dtype: str  # "auto" (the checkpoint's) or a dtype name
    device: str
    config: EngineConfig
    parallel: ParallelConfig
    address: str  # HOST:PORT of the rendezvous


@dataclass(frozen=True)
class LoadReport:
    """One rank's weights and memory: bytes of its parameters (and of its experts), resident memory before loading
    and the peak after it (their difference is what loading took at its peak)."""

    rank: int
    param_bytes: int
    expert_bytes: int
    rss_before: int
    peak_rss_after: int

    def describe(self) -> str:
        mib = 1 << 20
        return (
            f"rank {self.rank}: {self.param_bytes / mib:.1f} MiB of weights "
            f"({self.expert_bytes / mib:.1f} MiB experts); "
            f"peak RSS {self.peak_rss_after / mib:.1f} MiB ({self.rss_before / mib:.1f} MiB resident before loading)"
        )


@dataclass(frozen=True)
class _Status:
    rank: int
    num_blocks: int
    report: LoadReport | None
    error: str | None


class RankStartError(S1ServeError):
    """Another rank could not load its part (its message says why)."""


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def peak_rss() -> int:
    """This process's peak resident set size in bytes: VmHWM on Linux (ru_maxrss would include the parent's
    memory at fork time, which Linux carries across exec), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    peak = _status_bytes("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak


def current_rss() -> int:
    """This process's resident set size now, in bytes (the peak so far where /proc is missing)."""
    rss = _status_bytes("VmRSS")
    return peak_rss() if rss is None else rss


def expert_bytes(model: nn.Module) -> int:
    """Bytes of the routed experts' weights in this (shard of the) model."""
    return sum(p.nbytes for name, p in model.named_parameters() if name.endswith((".w13", ".w2")))


def model_dtype(model_dir: Path, dtype: str) -> torch.dtype:
    from s1serve.config import load_model_config
    from s1serve.models.registry import resolve_dtype

    return resolve_dtype(load_model_config(model_dir).text.dtype if dtype == "auto" else dtype)


def load_rank(spec: RankSpec, world: World) -> tuple[ModelRunner, list[LoadReport]]:
    """Loads this rank's shard and agrees with every rank on start-up (a collective: all ranks call it)."""
    from s1serve.models.registry import load_model

    before = current_rss()
    model: nn.Module | None = None
    try:
        model = load_model(spec.model_dir, model_dtype(spec.model_dir, spec.dtype), world.device, world.parallel)
        params = sum(p.nbytes for p in model.parameters())
        report = LoadReport(world.rank, params, expert_bytes(model), before, peak_rss())
        status = _Status(world.rank, kv_blocks_for(model, spec.config), report, None)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait in the gather
        status = _Status(world.rank, 0, None, str(exc))
        own_error: Exception | None = exc
    else:
        own_error = None
    statuses: list[Any] = [None] * world.size
    dist.all_gather_object(statuses, status, group=world.control)
    if own_error is not None:
        raise own_error
    failed = next((s for s in statuses if s.error is not None), None)
    if failed is not None:
        raise RankStartError(f"rank {failed.rank} could not start: {failed.error}")
    num_blocks = min(s.num_blocks for s in statuses)
    return ModelRunner(model, num_blocks, spec.config.block_size), [s.report for s in statuses]


def send(world: World, message: Any) -> None:
    """Rank 0: the next message to every follower."""
    dist.broadcast_object_list([message], src=0, group=world.control)


def follow(runner: ModelRunner, world: World) -> None:
    """Replays rank 0's calls until STOP."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=world.control)
        message = box[0]
        if message is STOP:
            return
        method, args = message
        if method in FOLLOWED:
            getattr(runner, method)(*args)
        elif message != HEARTBEAT:
            raise RuntimeError(f"unknown message from rank 0: {method!r}")


def follow_rank(spec: RankSpec, rank: int) -> int:
    """A follower's whole life: join, load, follow; the exit status (0 after STOP, 1 on a failure)."""
    world = init_distributed(spec.parallel, rank, spec.device, spec.address)
    try:
        runner, reports = load_rank(spec, world)
    except RankStartError:
        return 1  # the failing rank's own message reaches the driver
    except (S1ServeError, ValueError) as exc:  # a user error: the driver prints it too
        log.error("rank %d could not load its part: %s", rank, exc)
        return 1
    except Exception:
        log.exception("rank %d could not load its part", rank)
        return 1
    log.info("%s", reports[rank].describe())
    try:
        follow(runner, world)
    except Exception as exc:  # noqa: BLE001 - a failed collective means a rank (or rank 0) is gone
        log.error("rank %d: lost the other ranks (%s); exiting", rank, exc)
        return 1
    close_distributed(world)
    return 0


def die_with_parent(parent_pid: int) -> None:
    """This process must not outlive `parent_pid` (not even a SIGKILLed one): PR_SET_PDEATHSIG on Linux, a
    watching thread elsewhere. (Linux sends the signal when the parent's thread that started this process ends:
    ranks are started from the thread that holds the engine, the main thread of a server.)"""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the prctl took effect
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="s1serve-parent-watch", daemon=True).start()


def run_worker(spec: RankSpec, rank: int, parent_pid: int) -> None:
    """Entry point of a spawned follower process."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    status = follow_rank(spec, rank)
    # Out without the interpreter's teardown: now and then a C++ destructor of the torch runtime aborted it
    # ("terminate called without an active exception", exit -6) after the follower had finished cleanly.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
