"""EngineProcessClient: the EngineClient of an API server whose engine runs in another process (engine/core.py).

Requests, aborts and stats calls go out on a PUSH socket (from the event loop); a receiver thread reads the
engine's batched output messages from a DEALER socket and hands each step's deltas to the waiting streams with one
wake-up of their event loop. The same thread watches the engine process (a pidfd, readable once it has ended):
the moment it ends, open requests and waiting calls get EngineDeadError, `on_death` callbacks run, and every later
call fails at once.

Request ids are namespaced by this client, so several API servers can share one engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import select
import signal
import threading
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import zmq

from s1serve.engine.admission import Admission, QueueFullError
from s1serve.engine.client import EngineDeadError
from s1serve.engine.client_side import STREAM_END, ClientSide
from s1serve.engine.core import HELLO, EngineAddresses, decode, encode
from s1serve.engine.engine import EngineStats
from s1serve.engine.media import MediaInput
from s1serve.engine.outputs import OutputDelta
from s1serve.engine.step_clock import RunningStep, StepClock
from s1serve.sampling_params import InvalidParameterError, SamplingParams

STOP_TIMEOUT_S = 10.0  # how long a stopped engine process gets to stop its ranks before it is killed
HELLO_EVERY_MS = 500  # the handshake is repeated until the engine (still loading its model) answers

log = logging.getLogger("s1serve.engine_client")



class EngineProcessClient(ClientSide):
    def __init__(self, addresses: EngineAddresses, engine_pid: int, owns_engine: bool = False):
        """Connects and waits until the engine process has loaded its model; EngineDeadError if it ends first.
        `owns_engine`: close() stops the engine process too (the single API server in front of it)."""
        super().__init__()
        self.engine_pid = engine_pid
        self._death_note = addresses.death_note
        self._owns_engine = owns_engine
        self._identity = f"api-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        self._prefix = self._identity.decode() + "/"
        self._context = zmq.Context()
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)  # while the engine is in a long step, requests queue up here
        self._push.connect(addresses.inputs)
        self._push_lock = threading.Lock()
        self._dealer = self._context.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.IDENTITY, self._identity)
        self._dealer.connect(addresses.outputs)
        try:
            self._pidfd = os.pidfd_open(engine_pid)
        except ProcessLookupError:
            self._context.destroy(linger=0)
            raise EngineDeadError(f"the engine process (pid {engine_pid}) has ended") from None
        self._call_ids = itertools.count()
        self._poller = zmq.Poller()
        self._poller.register(self._dealer, zmq.POLLIN)
        self._poller.register(self._pidfd, zmq.POLLIN)
        info = self._handshake()
        self._clock = StepClock.shared(addresses.step_clock, create=False)  # the engine made it before it answered
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.admission: Admission = info["admission"]
        self._thread = threading.Thread(target=self._receive, name="s1serve-engine-client", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- EngineClient

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, media: Sequence[MediaInput] = ()
    ) -> AsyncIterator[OutputDelta]:
        """The request's deltas until every sample has finished. Fields beyond the ids and params (the media:
        plain tensors and ints) travel to Engine.add_request as keywords, pickled. An invalid request raises its
        ValueError here, as the engine found it; one over the admission limits QueueFullError, at once when this
        client's own open requests reach them."""
        fields = {"media": tuple(media)} if media else {}
        self._check_alive()
        key = self._prefix + request_id

        def submit(_: asyncio.AbstractEventLoop) -> None:
            self._send(("add", self._identity, key, list(prompt_ids), params, fields))

        # closed with this generator, so that leaving early aborts the request now, not when collected
        async with aclosing(self._request_stream(key, request_id, submit, lambda: self._send(("abort", key)))) as deltas:
            async for delta in deltas:
                yield delta

    def check_admission(self) -> None:
        self.admission.check_open(len(self._streams))

    def running_step(self) -> RunningStep | None:
        return self._clock.running()

    def abort(self, request_id: str) -> None:
        if not self.errored:
            self._send(("abort", self._prefix + request_id))

    async def stats(self) -> EngineStats:
        self._check_alive()
        self._join_loop()
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self._send(("stats", self._identity, call_id))
            self._check_alive()
            return await future
        finally:
            del self._calls[call_id]

    def close(self) -> None:
        """Ends open requests; stops the engine process if this client owns it (else it serves on, for the other
        API servers, until whoever started it stops it)."""
        self._mark_dead(EngineDeadError("the engine client was closed"), notify=False)
        self._thread.join(1.0)
        if self._owns_engine:
            stop_process(self.engine_pid)

    # ------------------------------------------------------------------------------------------------ internals

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._push_lock:
            self._push.send(encode(message))

    def _handshake(self) -> dict[str, Any]:
        while True:
            self._dealer.send(HELLO)
            events = dict(self._poller.poll(HELLO_EVERY_MS))
            if self._pidfd in events:
                self._context.destroy(linger=0)
                os.close(self._pidfd)
                raise EngineDeadError(f"the engine process (pid {self.engine_pid}) ended while starting")
            if self._dealer in events:
                kind, info = decode(self._dealer.recv())
                if kind == "ready":
                    return info

    def _receive(self) -> None:
        """The receiver thread: engine messages until the engine process ends or this client closes."""
        try:
            while not self.errored:
                events = dict(self._poller.poll(100))
                if self._dealer in events:
                    while True:
                        try:
                            frame = self._dealer.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._dispatch(decode(frame))
                if self._pidfd in events:
                    self._mark_dead(RuntimeError(self._why_dead()))
        except zmq.ContextTerminated:
            pass
        finally:
            self._context.destroy(linger=0)
            os.close(self._pidfd)

    def _why_dead(self) -> str:
        ended = f"the engine process (pid {self.engine_pid}) has exited"
        try:
            return f"{ended}: {self._death_note.read_text()}"
        except FileNotFoundError:
            return ended

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "deltas":
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list[Any]]]] = defaultdict(list)
            for request_id, deltas, done in message[1]:
                entry = self._streams.get(request_id)
                if entry is not None:
                    by_loop[entry[1]].append((entry[0], deltas + [STREAM_END] if done else deltas))
            for loop, batch in by_loop.items():
                loop.call_soon_threadsafe(_deliver, batch)
        elif kind == "error":
            _, request_id, param, text = message
            error = ValueError(text) if param is None else InvalidParameterError(param, text)
            entry = self._streams.get(request_id)
            if entry is not None:
                entry[1].call_soon_threadsafe(_deliver, [(entry[0], [error])])
        elif kind == "busy":
            _, request_id, text = message
            entry = self._streams.get(request_id)
            if entry is not None:
                entry[1].call_soon_threadsafe(_deliver, [(entry[0], [QueueFullError(text)])])
        elif kind == "stats":
            _, call_id, stats = message
            future = self._calls.get(call_id)
            if future is not None:
                future.get_loop().call_soon_threadsafe(_resolve, future, stats)


def stop_process(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL if `pid` has not ended within `timeout` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        ended, _, _ = select.select([pidfd], [], [], timeout)
        if not ended:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _deliver(batch: list[tuple[asyncio.Queue, list[Any]]]) -> None:
    for stream, items in batch:
        for item in items:
            stream.put_nowait(item)


def _resolve(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)
