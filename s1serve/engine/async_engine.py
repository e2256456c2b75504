"""The asyncio front of the engine, for the server.

The engine core runs in its own thread, so the event loop never waits on a forward pass. Requests and aborts
travel to it through a queue, in order; deltas come back to each request's asyncio queue on the loop that asked.
A request whose consumer goes away (the async generator is closed or cancelled) is aborted and its blocks freed.
If a step raises, the engine is dead: every open request gets the error, and so does every later call. After
`shutdown()` open requests end with finish_reason "abort" and later calls get EngineDeadError.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from s1serve.engine.config import EngineConfig
from s1serve.engine.engine import Engine, EngineStats
from s1serve.engine.outputs import OutputDelta
from s1serve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error (or was shut down); no request can be served any more."""


_DONE = object()  # end of a request's stream


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._streams: dict[str, asyncio.Queue] = {}  # touched on the event loop only
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}  # touched in the engine thread only
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="s1serve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(
        cls,
        model: str | Path,
        dtype: str = "auto",
        device: str = "cpu",
        config: EngineConfig | None = None,
        tokenizer: Any | None = None,
    ) -> "AsyncEngine":
        return cls(Engine.from_checkpoint(model, dtype, device, config, tokenizer))

    @property
    def errored(self) -> bool:
        return self._error is not None

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[OutputDelta]:
        """Yields the request's deltas (all n samples interleaved) until every sample has finished.

        Invalid input raises ValueError before anything is queued; the engine serves the others as before.
        """
        self._check_alive()
        prompt_ids = list(prompt_ids)
        self.engine.check_request(prompt_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_ids, params, asyncio.get_running_loop()))
        finished = False
        try:
            self._check_alive()  # after queuing: a loop that dies from now on sees this request when it drains
            while True:
                item = await stream.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            del self._streams[request_id]
            if not finished:
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        """Stops a request: its stream ends with finish_reason "abort" deltas, its blocks are freed."""
        self._commands.put(("abort", request_id))

    async def stats(self) -> EngineStats:
        """Engine statistics, taken after every command sent before this call has been handled."""
        self._check_alive()
        future = asyncio.get_running_loop().create_future()
        self._commands.put(("call", self.engine.stats, future))
        return await future

    def shutdown(self) -> None:
        """Stops the engine thread: open requests end with finish_reason "abort", later calls fail."""
        self._commands.put(("stop",))
        self._thread.join()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine has stopped: {self._error!r}") from self._error

    # ------------------------------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                commands = [] if busy else [self._commands.get()]
                while not self._commands.empty():
                    commands.append(self._commands.get_nowait())
                for command in commands:
                    if command[0] == "stop":
                        for request_id in list(self.engine.requests):
                            self._publish(self.engine.abort(request_id))
                        raise EngineDeadError("the engine was shut down")
                    self._handle(command)
                if self.engine.has_unfinished_requests():
                    self._publish(self.engine.step())
        except BaseException as exc:  # noqa: BLE001 - every open request must learn that the engine is gone
            self._error = exc
            dead = EngineDeadError(f"the engine has stopped: {exc!r}")
            for request_id, loop in self._loops.items():
                loop.call_soon_threadsafe(self._deliver, request_id, [dead])
            self._loops.clear()
            while not self._commands.empty():
                command = self._commands.get_nowait()
                if command[0] == "add":
                    command[4].call_soon_threadsafe(self._deliver, command[1], [dead])
                elif command[0] == "call":
                    command[2].get_loop().call_soon_threadsafe(_fail, command[2], dead)

    def _handle(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params, loop = command
            self._loops[request_id] = loop
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except ValueError as exc:
                self._publish_to(request_id, [exc])
        elif kind == "abort":
            self._publish(self.engine.abort(command[1]))
        elif kind == "call":
            _, function, future = command
            result = function()
            future.get_loop().call_soon_threadsafe(_resolve, future, result)

    def _publish(self, deltas: list[OutputDelta]) -> None:
        by_request: dict[str, list[Any]] = defaultdict(list)
        for delta in deltas:
            by_request[delta.request_id].append(delta)
        for request_id, items in by_request.items():
            if request_id not in self.engine.requests:
                items.append(_DONE)
            self._publish_to(request_id, items)

    def _publish_to(self, request_id: str, items: list[Any]) -> None:
        loop = self._loops.get(request_id)
        if loop is None:
            return
        if items[-1] is _DONE or isinstance(items[-1], BaseException):
            del self._loops[request_id]
        loop.call_soon_threadsafe(self._deliver, request_id, items)

    def _deliver(self, request_id: str, items: list[Any]) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            for item in items:
                stream.put_nowait(item)


def _resolve(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)

