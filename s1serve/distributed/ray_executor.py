"""`--distributed-executor-backend ray`: the followers of a TP/EP engine as Ray actors on a running Ray cluster.

Rank 0 stays in this process; ranks 1..N-1 are actors, one per device, placed by a placement group with one bundle
per rank ({"GPU": 1} on CUDA, {"CPU": 1} on CPU; PACK: as few nodes as fit). Bundle 0 is pinned to this node and
reserves rank 0's device: on CUDA a short-lived probe actor in it reports which GPU Ray set aside, and rank 0 uses
that one (this process must see all of the node's GPUs). The actors run the same follower code as local worker
processes (s1serve.distributed.worker.follow_rank) and rendezvous with rank 0 at this node's address. A thread
waits on the actors' follow() results: one that ends before the engine stops it (the actor died, or its rank
failed) is reported as a failure, and the engine becomes dead.

Ray is imported only here, and only with that flag: `ray.init(address="auto")` joins the cluster that
`ray start` made (or RAY_ADDRESS names); without one the error says so.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from s1serve.distributed.failure import WorkerDied
from s1serve.engine.failure import FailureSignal
from s1serve.distributed.launcher import STOP_TIMEOUT_S
from s1serve.distributed.spawned import LOG_FORMAT
from s1serve.distributed.worker import RankSpec, follow_rank
from s1serve.engine.config import EngineConfig
from s1serve.errors import S1ServeError
from s1serve.parallel.config import ParallelConfig

log = logging.getLogger("s1serve.ray")

PLACEMENT_TIMEOUT_S = 120.0


class RankActor:
    """A follower rank inside a Ray actor (wrapped with ray.remote when the backend is used)."""

    def follow(self, spec: RankSpec, rank: int) -> int:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # the actor's process has no other entry point
        return follow_rank(spec, rank)

    def gpu_id(self) -> int:
        import ray

        return int(ray.get_gpu_ids()[0])


class RayWorkers(FailureSignal):
    """The actors of ranks 1..N-1, watched by a thread (see the module's docstring)."""

    def __init__(self, actors: list[Any], refs: list[Any], group: Any):
        super().__init__()
        self.actors = actors
        self.refs = refs  # one follow() result per actor, in rank order
        self.group = group  # the placement group
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._terminated = False
        threading.Thread(target=self._watch, name="s1serve-ray-watch", daemon=True).start()

    def _watch(self) -> None:
        import ray

        pending = list(self.refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            if self._stopping.is_set():
                continue
            rank = self.refs.index(ready[0]) + 1
            try:
                status = ray.get(ready[0])
                reason = f"exited with status {status}"
            except Exception as exc:  # noqa: BLE001 - RayActorError and whatever the rank raised
                reason = f"failed: {exc}"
            self._fail(WorkerDied(f"the Ray actor of rank {rank} {reason}"))
        self._done.set()

    def _fail(self, error: WorkerDied) -> None:
        if self.report(error):
            self.terminate()

    def stop(self) -> None:
        self._stopping.set()
        self._done.wait(STOP_TIMEOUT_S)
        self.terminate()

    def terminate(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            if self._terminated:
                return
            self._terminated = True
        self._stopping.set()
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)


def start_ray_workers(
    model_dir: Path, dtype: str, device: str, config: EngineConfig, parallel: ParallelConfig
) -> tuple[RankSpec, RayWorkers]:
    """Places and starts ranks 1..N-1; returns rank 0's spec (its address and device) and the actors."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    try:
        ray.init(address="auto", ignore_reinit_error=True, log_to_driver=True)
    except ConnectionError as exc:
        raise S1ServeError(
            f"--distributed-executor-backend ray needs a running Ray cluster (`ray start --head` on this node): {exc}"
        ) from None
    ip = ray.util.get_node_ip_address()
    cuda = torch.device(device).type == "cuda"
    unit = {"GPU": 1} if cuda else {"CPU": 1}
    bundles = [{**unit, f"node:{ip}": 0.001}] + [dict(unit) for _ in range(parallel.world_size - 1)]
    group = placement_group(bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise S1ServeError(
            f"the Ray cluster cannot place {parallel.world_size} ranks of {unit} within {PLACEMENT_TIMEOUT_S:.0f} s "
            f"(it has {ray.cluster_resources()})"
        ) from None
    actor_class = ray.remote(RankActor)

    def actor(bundle: int) -> Any:
        strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle)
        return actor_class.options(
            num_cpus=0 if cuda else 1, num_gpus=1 if cuda else 0, scheduling_strategy=strategy
        ).remote()

    driver_device = device
    if cuda:
        probe = actor(0)
        driver_device = f"cuda:{ray.get(probe.gpu_id.remote())}"
        ray.kill(probe)
    address = parallel.address or _free_address(ip)
    spec = RankSpec(model_dir, dtype, "cuda:0" if cuda else device, config, parallel, address)
    actors = [actor(rank) for rank in range(1, parallel.world_size)]
    refs = [a.follow.remote(spec, rank) for rank, a in enumerate(actors, start=1)]
    log.info("started ranks 1..%d as Ray actors; rank 0 at %s", parallel.world_size - 1, address)
    return dataclasses.replace(spec, device=driver_device), RayWorkers(actors, refs, group)


def _free_address(ip: str) -> str:
    with socket.socket() as s:
        s.bind((ip, 0))
        return f"{ip}:{s.getsockname()[1]}"
