"""What both engine clients (AsyncEngine, EngineProcessClient) keep on the event-loop side: the open request
streams and pending calls, the event loops they wait on, and the engine's death, told once to all of them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from s1serve.engine.client import EngineDeadError
from s1serve.engine.failure import FailureSignal
from s1serve.engine.outputs import OutputDelta

STREAM_END = object()  # put on a request's stream after its last delta


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

    def check_admission(self) -> None:
        """QueueFullError when this client's open requests already fill the engine's admission limits."""
        raise NotImplementedError

    async def _request_stream(self, key: str, request_id: str, submit: Callable[[asyncio.AbstractEventLoop], None],
                              cancel: Callable[[], None]) -> AsyncIterator[OutputDelta]:
        """A request's deltas: its stream is registered under `key`, `submit(loop)` sends it to the engine, and the
        stream is read until STREAM_END or an error. The engine's death reaches it from the moment it is
        registered; a stream left early calls `cancel` (the engine aborts the request and frees its blocks)."""
        if key in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_admission()
        loop = self._join_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[key] = (stream, loop)
        finished = False
        try:
            submit(loop)
            self._check_alive()  # after registering: a death from now on reaches this stream
            while True:
                item = await stream.get()
                if item is STREAM_END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            del self._streams[key]
            if not finished and not self.errored:
                cancel()

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
