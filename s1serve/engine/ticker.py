"""One turn of an engine loop (the in-process AsyncEngine thread and the engine process share it).

A runner that needs a heartbeat (a DP rank whose MoE layers exchange tokens with the other DP ranks) is ticked
without pause: each tick asks all ranks whether any has work, steps if one has (an idle rank runs the model's
empty step), and sleeps a few milliseconds if none has (1 ms, doubling to 10 ms while all stay idle), so that
every rank enters the same forwards. Each step is timed on the step clock, which /health reads.

Freed host memory goes back to the OS (host_memory.py) once the engine has had no request for RELEASE_AFTER_IDLE_S:
not as the last request ends, because a client that keeps a batch in flight often lets it drain to nothing between
two bursts (every request of a closed loop ends in the same step), and the next burst's prefill would then fault the
whole heap in again (~50000 page faults for a 2048-token step of the bench preset). The loop learns from
`wait_s` how long it may block for new commands so that the release is not late.
"""

from __future__ import annotations

import time

from s1serve.engine.engine import Engine
from s1serve.engine.host_memory import release_free_memory
from s1serve.engine.outputs import OutputDelta
from s1serve.engine.step_clock import StepClock

IDLE_TICK_S = (0.001, 0.01)  # pause between heartbeat ticks when no rank has work: doubling up to the maximum
RELEASE_AFTER_IDLE_S = 2.0  # without a request this long, freed host memory goes back to the OS


class EngineTicker:
    def __init__(self, engine: Engine, clock: StepClock, test_step_sleep_s: float = 0.0):
        """`test_step_sleep_s`: tests only; every step sleeps that long first (a slow or hung step)."""
        self.engine = engine
        self.clock = clock
        self.test_step_sleep_s = test_step_sleep_s
        self._pause = IDLE_TICK_S[0]
        self._idle_since: float | None = None  # when the last request ended, while its memory is not yet released

    @property
    def idle(self) -> bool:
        """Nothing to do until a new command arrives: the loop may block on its input."""
        return not self.engine.runner.needs_heartbeat and not self.engine.has_unfinished_requests()

    def wait_s(self) -> float | None:
        """How long the loop may block for a new command before its next tick: 0 while there is work, None (no
        limit) when idle with nothing pending, else the time left until freed memory is to be released."""
        if not self.idle:
            return 0.0
        if self._idle_since is None:
            return None
        return max(0.0, self._idle_since + RELEASE_AFTER_IDLE_S - time.monotonic())

    def tick(self) -> list[OutputDelta]:
        """A step if any rank has work (its deltas), else a heartbeat pause or nothing."""
        engine, runner = self.engine, self.engine.runner
        had_requests = engine.has_unfinished_requests()
        if had_requests:
            self._idle_since = None
        elif self._idle_since is not None and time.monotonic() - self._idle_since >= RELEASE_AFTER_IDLE_S:
            release_free_memory()
            self._idle_since = None
        if runner.any_work(had_requests):
            self.clock.begin(len(engine.requests))
            if self.test_step_sleep_s:
                time.sleep(self.test_step_sleep_s)
            deltas = engine.step()
            self.clock.end()
            if had_requests and not engine.has_unfinished_requests():
                self._idle_since = time.monotonic()  # this rank's last request ended (not a DP rank's empty step)
            self._pause = IDLE_TICK_S[0]
            return deltas
        if runner.needs_heartbeat:
            time.sleep(self._pause)
            self._pause = min(2 * self._pause, IDLE_TICK_S[1])
        return []
