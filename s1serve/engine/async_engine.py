"""The asyncio front of the engine, for the server.

The engine core runs in its own thread, so the event loop never waits on a forward pass. Requests and aborts
travel to it through a queue, in order; deltas come back to each request's asyncio queue on the loop that asked.
A request whose consumer goes away (the async generator is closed or cancelled) is aborted and its blocks freed.

If a step raises, or the runner reports a failure from outside a step (a worker process of a TP/EP engine died),
the engine is dead: every open request and every waiting call gets EngineDeadError at once, even while the engine
thread is still blocked in a collective, and so does every later call; `on_death` callbacks run. After
`shutdown()` open requests end with finish_reason "abort" and later calls get EngineDeadError.

The loop's turn (a step, or a heartbeat for a DP rank) is engine/ticker.py's.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from s1serve.engine.admission import QueueFullError
from s1serve.engine.client import EngineDeadError
from s1serve.engine.client_side import STREAM_END, ClientSide
from s1serve.engine.engine import Engine, EngineStats
from s1serve.engine.media import MediaInput
from s1serve.engine.outputs import OutputDelta
from s1serve.engine.step_clock import RunningStep, StepClock
from s1serve.engine.ticker import EngineTicker
from s1serve.sampling_params import SamplingParams

DEAD_JOIN_S = 2.0  # how long shutdown waits for the thread of a dead engine (it may be stuck in a collective)




class AsyncEngine(ClientSide):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self._commands: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}  # touched in the engine thread only
        self._clock = StepClock()
        self._thread = threading.Thread(target=self._run, name="s1serve-engine", daemon=True)
        self._thread.start()
        engine.runner.on_failure(self.fail)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, media: Sequence[MediaInput] = ()
    ) -> AsyncIterator[OutputDelta]:
        """Yields the request's deltas (all n samples interleaved) until every sample has finished.

        Invalid input raises ValueError before anything is queued; the engine serves the others as before. A
        request over the admission limits (engine/admission.py) raises QueueFullError.
        """
        self._check_alive()
        prompt_ids = list(prompt_ids)
        media = tuple(media)
        self.engine.check_request(prompt_ids, params, media)

        def submit(loop: asyncio.AbstractEventLoop) -> None:
            self._commands.put(("add", request_id, prompt_ids, params, media, loop))

        # closed with this generator, so that leaving early aborts the request now, not when collected
        async with aclosing(self._request_stream(request_id, request_id, submit, lambda: self.abort(request_id))) as deltas:
            async for delta in deltas:
                yield delta

    def check_admission(self) -> None:
        self.engine.admission.check_open(len(self._streams))

    def running_step(self) -> RunningStep | None:
        return self._clock.running()

    def abort(self, request_id: str) -> None:
        """Stops a request: its stream ends with finish_reason "abort" deltas, its blocks are freed."""
        self._commands.put(("abort", request_id))

    async def stats(self) -> EngineStats:
        """Engine statistics, taken after every command sent before this call has been handled."""
        self._check_alive()
        self._join_loop()
        future = asyncio.get_running_loop().create_future()
        self._calls[id(future)] = future
        try:
            self._commands.put(("call", self.engine.stats, future))
            self._check_alive()
            return await future
        finally:
            del self._calls[id(future)]

    def shutdown(self) -> None:
        """Stops the engine thread: open requests end with finish_reason "abort", later calls fail.

        The Engine (and its runner's other ranks) stays up: stop it with engine.shutdown()."""
        self._commands.put(("stop",))
        self._thread.join(DEAD_JOIN_S if self.errored else None)

    def close(self) -> None:
        """shutdown(), then the Engine's own (which stops its runner's other ranks)."""
        self.shutdown()
        self.engine.shutdown()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def fail(self, error: BaseException) -> None:
        """Marks the engine dead (from any thread): open requests and pending calls get EngineDeadError now."""
        if self._mark_dead(error):
            self._commands.put(("stop",))  # wakes an idle engine thread, which then ends

    # ------------------------------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        engine = self.engine
        ticker = EngineTicker(engine, self._clock)
        try:
            while not self.errored:
                wait = ticker.wait_s()
                try:
                    commands = [self._commands.get(timeout=wait)] if wait != 0 else []
                except queue.Empty:  # idle long enough: the tick releases freed memory
                    commands = []
                while not self._commands.empty():
                    commands.append(self._commands.get_nowait())
                for command in commands:
                    if command[0] == "stop":
                        for request_id in list(engine.requests):
                            self._publish(engine.abort(request_id))
                        raise EngineDeadError("the engine was shut down")
                    self._handle(command)
                deltas = ticker.tick()
                if deltas:
                    self._publish(deltas)
        except BaseException as exc:  # noqa: BLE001 - every open request must learn that the engine is gone
            self.fail(exc)
            self._loops.clear()

    def _handle(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params, media, loop = command
            self._loops[request_id] = loop
            try:
                self.engine.admit(len(prompt_ids))
                self.engine.add_request(request_id, prompt_ids, params, media)
            except (QueueFullError, ValueError) as exc:
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
                items.append(STREAM_END)
            self._publish_to(request_id, items)

    def _publish_to(self, request_id: str, items: list[Any]) -> None:
        loop = self._loops.get(request_id)
        if loop is None:
            return
        if items[-1] is STREAM_END or isinstance(items[-1], BaseException):
            del self._loops[request_id]
        loop.call_soon_threadsafe(self._deliver, request_id, items)

    def _deliver(self, request_id: str, items: list[Any]) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            for item in items:
                entry[0].put_nowait(item)


def _resolve(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)

