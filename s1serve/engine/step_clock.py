"""The engine loop's step clock: which step is running and since when, readable while the step runs.

An engine cannot answer a question while it is inside a step, so /health must not ask it: the loop writes the
start of each step (its number, its sequences, the monotonic time; time 0 while idle) into a small buffer and the
API server reads it. The buffer is a bytearray when both sides share a process (AsyncEngine) and a shared memory
map of a file beside the engine's sockets when they do not (engine/core.py); CLOCK_MONOTONIC is one clock for every
process of the machine. A reader may see a step that ended a moment ago: it only ever reports one stuck past a limit
of seconds.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass
from pathlib import Path

_LAYOUT = struct.Struct("<dqq")  # started (monotonic seconds, 0.0 when idle), step number, sequences


@dataclass(frozen=True)
class RunningStep:
    number: int  # steps counted from 1 since the engine started
    sequences: int  # requests the engine held when the step began
    age_s: float  # how long it has been running

    def describe(self) -> str:
        requests = f"{self.sequences} request{'' if self.sequences == 1 else 's'}"
        return f"engine step {self.number} ({requests}) has been running for {self.age_s:.1f} s"


class StepClock:
    def __init__(self, buffer: bytearray | mmap.mmap | None = None):
        self._buffer = buffer if buffer is not None else bytearray(_LAYOUT.size)
        self._number = 0

    @classmethod
    def shared(cls, path: Path, create: bool) -> StepClock:
        """The clock in file `path`: created (zeroed) by the engine process, opened by its API servers."""
        with open(path, "w+b" if create else "r+b") as file:
            if create:
                file.write(bytes(_LAYOUT.size))
                file.flush()
            return cls(mmap.mmap(file.fileno(), _LAYOUT.size))

    def begin(self, sequences: int) -> None:
        self._number += 1
        _LAYOUT.pack_into(self._buffer, 0, time.monotonic(), self._number, sequences)

    def end(self) -> None:
        _LAYOUT.pack_into(self._buffer, 0, 0.0, self._number, 0)

    def running(self) -> RunningStep | None:
        """The step now running, or None while the engine waits for work."""
        started, number, sequences = _LAYOUT.unpack_from(self._buffer, 0)
        if started == 0.0:
            return None
        return RunningStep(number, sequences, max(0.0, time.monotonic() - started))
