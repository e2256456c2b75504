"""What both engine clients (AsyncEngine, EngineProcessClient) keep on the event-loop side: the open request
streams and pending calls, the event loops they wait on, and the engine's death, told once to all of them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from s1serve.engine.client import EngineDeadError
from s1serve.engine.failure import FailureSignal


class ClientSide:
    def __init__(self) -> None:
        # request id -> (stream, its loop); call id -> future. Added and removed on their event loop.
        self._streams: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._calls: dict[Any, asyncio.Future] = {}
        self._death = FailureSignal()
        self._loops_lock = threading.Lock()
        self._client_loops: set[asyncio.AbstractEventLoop] = set()

    @property
    def errored(self) -> bool:
        return self._death.failure is not None

    @property
    def error(self) -> BaseException | None:
        """Why the engine is dead (None while it lives)."""
        return self._death.failure

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """Calls `callback(error)` once when the engine dies (from whichever thread notices; at once if dead)."""
        self._death.on_failure(callback)

    def _mark_dead(self, error: BaseException, notify: bool = True) -> bool:
        """The engine is dead (from any thread): the on_death callbacks run (unless `notify` is False: a close on
        purpose), open requests and pending calls get EngineDeadError now. False if it was dead before."""
        if not self._death.report(error, notify):
            return False
        # Read after the death is recorded: a loop that joins later sees it in _check_alive.
        with self._loops_lock:
            loops = list(self._client_loops)
        dead = EngineDeadError(f"the engine has stopped: {error}")
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self._fail_waiters, loop, dead)
            except RuntimeError:  # that loop has closed: nothing of it waits
                pass
        return True

    def _check_alive(self) -> None:
        error = self._death.failure
        if error is not None:
            raise EngineDeadError(f"the engine has stopped: {error}") from error

    def _join_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            self._client_loops.add(loop)
        return loop

    def _fail_waiters(self, loop: asyncio.AbstractEventLoop, dead: EngineDeadError) -> None:
        for stream, stream_loop in self._streams.values():
            if stream_loop is loop:
                stream.put_nowait(dead)
        for future in self._calls.values():
            if future.get_loop() is loop and not future.done():
                future.set_exception(dead)
