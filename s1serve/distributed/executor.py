"""Runners over many ranks, and `create_runner`, which picks and builds the runner a ParallelConfig asks for.

- One rank (or a DP replica with ep == 1): a ModelRunner on the whole model.
- TP/EP (dp == 1): this process is rank 0. It starts the other ranks (local processes, see launcher, or Ray actors,
  see ray_executor; ranks of other nodes come from their `--headless` launchers), joins the world, loads its shard
  and returns a DistributedRunner: every call is first broadcast to the followers, then run on rank 0's shard, so
  all ranks run the same forward. Rank 0 holds the engine (scheduler, blocks, sampler); the others hold only
  their shard and KV cache. When idle it sends a heartbeat now and then, so that followers can tell a quiet rank 0
  from a vanished one. A follower that dies is reported (from the supervisor's thread) to whoever listens through
  `on_failure`: the AsyncEngine then fails at once.
- DP with ep == dp: this process is DP rank `rank` with its own engine; its MoE layers exchange tokens with the
  other DP ranks, so it returns a LockstepRunner, which needs a heartbeat: each tick of the engine loop all ranks
  agree whether any has work (one all-reduce of a flag over the control group); then every rank runs a forward,
  the ones without work the model's idle step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from s1serve.engine.failure import FailureSignal
from s1serve.parallel.config import ParallelConfig
from s1serve.distributed.groups import (
    World,
    close_distributed,
    collective_timeout,
    free_loopback_address,
    init_distributed,
    rank_device,
    share_cpu,
)
from s1serve.distributed.worker import HEARTBEAT, STOP, LoadReport, RankSpec, load_rank, model_dtype, send
from s1serve.engine.config import EngineConfig
from s1serve.engine.model_runner import ModelRunner, Runner, StepOutput, StepSequence, kv_blocks_for

log = logging.getLogger("s1serve.executor")

LOCK_TIMEOUT_S = 5.0  # how long shutdown waits for a step in flight before it gives up on a clean stop
BLAME_WAIT_S = 1.0  # after a failed collective, how long to wait for the watcher to say which rank died


class Workers(Protocol):
    """The processes or actors of ranks 1..N-1 started from here (launcher.Supervisor, ray_executor.RayWorkers)."""

    def on_failure(self, callback: Callable[[BaseException], None]) -> None: ...

    def stop(self) -> None:
        """Waits a while for the followers to exit (after STOP), then kills what is left."""

    def terminate(self) -> None:
        """Kills the followers now."""


def create_runner(
    model_dir: Path, dtype: str, device: str, config: EngineConfig, parallel: ParallelConfig, rank: int = 0
) -> Runner:
    """The runner for global rank `rank` of `parallel` (0, or a DP rank): loads its part, starts or joins the rest."""
    if parallel.dp > 1 and parallel.ep > 1:
        spec = RankSpec(model_dir, dtype, device, config, parallel, _address(parallel))
        world = init_distributed(parallel, rank, device, spec.address)
        local, reports = _load(spec, world)
        log.info("%s", reports[rank].describe())
        return LockstepRunner(local, world, reports)
    if parallel.dp > 1 or not parallel.is_distributed:  # one rank, or an independent DP replica
        return _single_runner(model_dir, dtype, device, config, parallel, rank)
    if rank != 0:
        raise ValueError(f"rank {rank} of a TP/EP engine is a follower: start it with --headless")
    return start_driver(model_dir, dtype, device, config, parallel)


def _address(parallel: ParallelConfig) -> str:
    if not parallel.address:
        raise ValueError("the DP ranks need --dist-init-addr (the launcher passes one down)")
    return parallel.address


def _single_runner(
    model_dir: Path, dtype: str, device: str, config: EngineConfig, parallel: ParallelConfig, rank: int
) -> ModelRunner:
    from s1serve.models.registry import load_model

    dev = rank_device(device, parallel, rank)
    share_cpu(dev, parallel)
    model = load_model(model_dir, model_dtype(model_dir, dtype), dev)
    return ModelRunner(model, kv_blocks_for(model, config), config.block_size)


def _load(spec: RankSpec, world: World) -> tuple[ModelRunner, list[LoadReport]]:
    """load_rank, leaving the world if this rank (or another) could not start."""
    try:
        return load_rank(spec, world)
    except BaseException:
        close_distributed(world)
        raise


def start_driver(
    model_dir: Path, dtype: str, device: str, config: EngineConfig, parallel: ParallelConfig
) -> "DistributedRunner":
    """Rank 0 of a TP/EP engine: starts this node's other ranks, joins the world, loads rank 0's shard."""
    workers: Workers
    if parallel.distributed_executor_backend == "ray":
        from s1serve.distributed.ray_executor import start_ray_workers

        spec, workers = start_ray_workers(model_dir, dtype, device, config, parallel)
    else:
        from s1serve.distributed.launcher import start_local_workers

        spec = RankSpec(model_dir, dtype, device, config, parallel, parallel.address or free_loopback_address())
        workers = start_local_workers(spec)
    try:
        world = init_distributed(parallel, 0, spec.device, spec.address)
        local, reports = _load(spec, world)
    except BaseException:
        workers.terminate()
        raise
    for report in reports:
        log.info("%s", report.describe())
    return DistributedRunner(local, world, workers, reports)


class _OverLocalShard:
    """A runner built around this rank's own ModelRunner (`local`): the model, and the KV geometry, are its."""

    local: ModelRunner

    @property
    def model(self) -> nn.Module:
        return self.local.model

    @property
    def num_blocks(self) -> int:
        return self.local.num_blocks

    @property
    def block_size(self) -> int:
        return self.local.block_size


class DistributedRunner(_OverLocalShard):
    """Rank 0's runner of a TP/EP engine: each call is broadcast to the followers, then run on rank 0's shard."""

    needs_heartbeat = False

    def __init__(self, local: ModelRunner, world: World, workers: Workers, reports: list[LoadReport]):
        self.local = local
        self.world = world
        self.workers = workers
        self.reports = reports  # every rank's, in rank order
        self._lock = threading.Lock()  # one message (and its forward) at a time: steps and heartbeats
        self._failure = FailureSignal()  # a follower gone (the workers' watcher, or a heartbeat that failed)
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        workers.on_failure(self._failure.report)
        threading.Thread(target=self._heartbeat, name="s1serve-heartbeat", daemon=True).start()

    def execute(self, seqs: list[StepSequence], logits_for: list[int]) -> StepOutput:
        return self._call("execute", seqs, logits_for)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        return self._call("prompt_logits", list(token_ids))

    def idle(self) -> None:
        pass

    def any_work(self, local: bool) -> bool:
        return local

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        self._failure.on_failure(callback)

    def _call(self, method: str, *args: object) -> Any:
        with self._lock:
            if self._failure.failure is not None:
                raise self._failure.failure
            if self._closed.is_set():
                raise RuntimeError("the runner was shut down")
            try:
                send(self.world, (method, args))
                self._last_sent = time.monotonic()
                return getattr(self.local, method)(*args)
            except RuntimeError as exc:  # a collective failed: say which rank went, if the watcher can tell
                if self._failure.wait(BLAME_WAIT_S):
                    raise self._failure.failure from exc
                raise

    def _heartbeat(self) -> None:
        interval = collective_timeout() / 4
        while not self._closed.wait(interval / 4):
            if time.monotonic() - self._last_sent < interval or not self._lock.acquire(blocking=False):
                continue
            try:
                if self._failure.failure is None and not self._closed.is_set():
                    send(self.world, HEARTBEAT)
                    self._last_sent = time.monotonic()
            except RuntimeError as exc:
                self._failure.report(RuntimeError(f"lost the other ranks: {exc}"))
            finally:
                self._lock.release()

    def shutdown(self) -> None:
        """Tells the followers to stop and waits for them (kills them if they are stuck), then leaves the world."""
        if self._closed.is_set():
            return
        self._closed.set()
        clean = self._failure.failure is None and self._lock.acquire(timeout=LOCK_TIMEOUT_S)
        if clean:
            try:
                send(self.world, STOP)
            except RuntimeError:
                clean = False
            finally:
                self._lock.release()
        if clean:
            self.workers.stop()
            close_distributed(self.world)
        else:
            self.workers.terminate()


class LockstepRunner(_OverLocalShard):
    """A DP rank whose MoE layers exchange tokens with the other DP ranks: all ranks must enter the same forwards."""

    needs_heartbeat = True

    def __init__(self, local: ModelRunner, world: World, reports: list[LoadReport]):
        self.local = local
        self.world = world
        self.reports = reports

    def execute(self, seqs: list[StepSequence], logits_for: list[int]) -> StepOutput:
        return self.local.execute(seqs, logits_for)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        raise ValueError("prompt_logits runs outside the engine loop, which a DP rank with EP cannot leave")

    @torch.inference_mode()
    def idle(self) -> None:
        self.local.model.idle_step()

    def any_work(self, local: bool) -> bool:
        flag = torch.tensor([int(local)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.world.control)
        return bool(flag.item())

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        pass  # a peer's failure surfaces as a failed collective in a step

    def shutdown(self) -> None:
        close_distributed(self.world)
