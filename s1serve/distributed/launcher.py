"""Starting this node's ranks as processes and supervising them.

- TP/EP (dp == 1), node 0: the server (or LLM) process is rank 0; `start_local_workers` spawns the node's other
  ranks as followers (s1serve.distributed.worker). Supervisor threads wait on them: a worker that ends
  before it is told to stop is a failure, reported to the runner (which makes the engine dead) before the
  remaining workers are stopped.
- TP/EP, a `--headless` node: `run_headless` spawns the node's followers and exits when they exit: 0 when rank 0
  stopped them, 1 when one failed (e.g. rank 0 went away).
- DP (dp > 1): `run_dp_ranks` spawns one process per local DP rank, each running what the entry point gives it
  (s1serve.entrypoints: a whole api_server on --server-port + its DP rank), and exits non-zero a few seconds
  after one of them fails (they are coupled by their MoE collectives under ep == dp; independent replicas are
  stopped alike, so that a deployment is either whole or visibly gone).

Processes are started fresh (`python -m s1serve.distributed.spawned`, never forked: torch and threads) and die
with their parent, even a SIGKILLed one. SIGTERM / SIGINT to a --headless or DP launcher stops its processes
and exits 0 (a DP rank is given `drain_s` seconds to drain its requests first); a second signal kills them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from s1serve.distributed.failure import WorkerDied
from s1serve.engine.failure import FailureSignal
from s1serve.distributed.groups import free_loopback_address
from s1serve.distributed.worker import RankSpec, run_worker
from s1serve.parallel.config import ParallelConfig

log = logging.getLogger("s1serve.launcher")

FAILURE_GRACE_S = 3.0  # after a failure, how long the others stay up (so that /health can be seen answering 503)
STOP_TIMEOUT_S = 10.0  # how long stopped processes get to exit before they are killed


class Child:
    """A process started by `spawn`: `python -m s1serve.distributed.spawned NAME`, given its function on stdin."""

    def __init__(self, name: str, target: Callable[..., Any], args: tuple[Any, ...]):
        self.name = name
        # The name rides along as an argument only to show in `ps`.
        command = [sys.executable, "-m", "s1serve.distributed.spawned", name]
        self.popen = subprocess.Popen(command, stdin=subprocess.PIPE)
        self.pid = self.popen.pid
        assert self.popen.stdin is not None
        with self.popen.stdin:
            pickle.dump((target, (*args, os.getpid())), self.popen.stdin)

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def describe_exit(self) -> str:
        code = self.popen.returncode
        if code is not None and code < 0:
            return f"{self.name} (pid {self.pid}) was killed by {signal.Signals(-code).name}"
        return f"{self.name} (pid {self.pid}) exited with status {code}"


def spawn(target: Callable[..., Any], args: list[tuple[Any, ...]], names: list[str]) -> list[Child]:
    """One process per argument tuple, running target(*args, parent_pid) (a module-level function).

    Not multiprocessing: a spawned multiprocessing child re-imports the parent's __main__, which breaks scripts
    that call LLM(tp=2) without an `if __name__ == "__main__"` guard."""
    return [Child(name, target, a) for a, name in zip(args, names)]


class Supervisor(FailureSignal):
    """Watches processes from threads. Failure: any exit before stop() when `until_stopped` (the processes are
    meant to run until told), else a non-zero exit. On the first failure the callbacks run, then after `grace`
    seconds the other processes are stopped."""

    def __init__(self, processes: list[Child], until_stopped: bool, grace: float = 0.0):
        super().__init__()
        self.processes = processes
        self.until_stopped = until_stopped
        self.grace = grace
        self._stopping = threading.Event()
        self._waiters = [
            threading.Thread(target=self._watch, args=(proc,), name=f"s1serve-watch-{proc.pid}", daemon=True)
            for proc in processes
        ]
        for waiter in self._waiters:
            waiter.start()

    def _watch(self, proc: Child) -> None:
        code = proc.popen.wait()
        failed = code != 0 or (self.until_stopped and not self._stopping.is_set())
        if failed and not self._stopping.is_set():
            self._fail(WorkerDied(proc.describe_exit()))

    def _fail(self, error: WorkerDied) -> None:
        if not self.report(error):
            return
        if self.grace:
            self._stopping.wait(self.grace)
        self._terminate()

    def _terminate(self) -> None:
        self._stopping.set()
        for proc in self.processes:
            if proc.exitcode is None:
                proc.popen.terminate()

    def _join(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for waiter in self._waiters:
            waiter.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(w.is_alive() for w in self._waiters)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Lets the processes exit (after they were told to) for up to `timeout` seconds, then kills the rest."""
        self._stopping.set()
        if not self._join(timeout):
            for proc in self.processes:
                if proc.exitcode is None:
                    proc.popen.kill()
            self._join(None)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to every process still running, then stop(timeout)."""
        self._terminate()
        self.stop(timeout)

    def kill(self) -> None:
        """SIGKILL to every process still running."""
        self._stopping.set()
        for proc in self.processes:
            if proc.exitcode is None:
                proc.popen.kill()

    def wait(self) -> int:
        """Blocks until every process has ended; 1 if one failed, else 0."""
        while not self._join(0.5):  # a timed wait keeps the main thread open to signals
            pass
        return 0 if self.failure is None else 1


def start_local_workers(spec: RankSpec) -> Supervisor:
    """Node 0 of a TP/EP engine: its ranks other than 0, as followers."""
    ranks = [r for r in spec.parallel.local_ranks if r != 0]
    procs = spawn(run_worker, [(spec, r) for r in ranks], [f"rank-{r}" for r in ranks])
    return Supervisor(procs, until_stopped=True)


def _stop_on_signals(supervisor: Supervisor, drain_s: float = 0.0) -> None:
    signalled = threading.Event()

    def handler(signum: int, _: FrameType | None) -> None:
        if signalled.is_set():
            log.warning("%s again: killing this node's ranks", signal.Signals(signum).name)
            supervisor.kill()
            return
        signalled.set()
        log.info("%s: stopping this node's ranks", signal.Signals(signum).name)
        threading.Thread(target=supervisor.terminate, args=(STOP_TIMEOUT_S + drain_s,), daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_headless(spec: RankSpec) -> int:
    """A --headless node: its followers of rank 0's engine; exits when they do."""
    parallel = spec.parallel
    ranks = list(parallel.local_ranks)
    log.info("headless node %d: ranks %s, rank 0 at %s", parallel.node_rank, ranks, parallel.address)
    supervisor = Supervisor(spawn(run_worker, [(spec, r) for r in ranks], [f"rank-{r}" for r in ranks]), False)
    _stop_on_signals(supervisor)
    return supervisor.wait()


def run_dp_ranks(serve_rank: Callable[..., None], args: Any, parallel: ParallelConfig, drain_s: float = 0.0) -> int:
    """This node's DP ranks, each a process running serve_rank(args, parallel, rank, parent_pid) (a module-level
    function that serves DP rank `rank` and exits with its status); exits when they do (non-zero if one failed).
    On SIGTERM each rank gets `drain_s` seconds (its --shutdown-timeout) more than STOP_TIMEOUT_S to exit."""
    if parallel.ep > 1 and not parallel.address:
        parallel = dataclasses.replace(parallel, dist_init_addr=free_loopback_address())
    ranks = list(parallel.local_ranks)
    procs = spawn(serve_rank, [(args, parallel, r) for r in ranks], [f"dp-rank-{r}" for r in ranks])
    supervisor = Supervisor(procs, until_stopped=True, grace=FAILURE_GRACE_S)
    _stop_on_signals(supervisor, drain_s)
    return supervisor.wait()
