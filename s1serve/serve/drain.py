"""Graceful shutdown of an HTTP server (the api_server and the proxy): the first SIGTERM or SIGINT drains, a second
one exits at once.

Draining: from the signal on, every new request is answered 503 in JSON (/health too, so that load balancers and
the proxy stop sending; /metrics stays open) while the requests already in flight run on. `on_drain` runs first
(an api_server leaves its proxy). When none is left in flight, or when the grace period (`--shutdown-timeout`) is
over and `on_timeout` has ended the stragglers (the api_server gives them an error), uvicorn shuts down as usual and
the process exits 0. The listening socket stays open while draining, so that a late client gets a 503 rather than
a refused connection. A second signal exits at once with status 128 + the signal's number (the engine process
dies with its parent). A signal that this process was started with ignored stays ignored (the API servers of
--api-server-count leave SIGINT to their launcher, which forwards SIGTERM).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn

STRAGGLER_S = 5.0  # after the grace period: how long requests given their error get to finish
log = logging.getLogger("s1serve.drain")


class DrainGate:
    """ASGI middleware: counts the requests in flight and, once draining, answers new ones with `refuse(path)`."""

    def __init__(self, app: Any, refuse: Callable[[str], Any], open_paths: tuple[str, ...] = ("/metrics",)):
        self.app = app
        self.refuse = refuse
        self.open_paths = frozenset(open_paths)
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        if self.draining:
            return await self.refuse(scope["path"])(scope, receive, send)
        self.in_flight += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if some still are after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True


class DrainingServer(uvicorn.Server):
    """A uvicorn.Server that drains on its first signal (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, gate: DrainGate, grace_s: float,
                 on_drain: Callable[[], Awaitable[None]] | None = None, on_timeout: Callable[[], None] | None = None):
        if config.timeout_graceful_shutdown is None:
            config.timeout_graceful_shutdown = int(STRAGGLER_S)  # uvicorn's own wait, after the drain
        super().__init__(config)
        self.gate = gate
        self.grace_s = grace_s
        self.on_drain = on_drain
        self.on_timeout = on_timeout
        self._signalled_at: float | None = None
        self._drain: asyncio.Task | None = None

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without re-raising the signal after the shutdown (the exit status is ours to give)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, self.handle_exit)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self._signalled_at is not None:
            log.warning("%s again while draining: exiting now", name)
            os._exit(128 + sig)
        self._signalled_at = time.monotonic()
        log.info("%s: draining (new requests get 503) for up to %g s", name, self.grace_s)

    async def on_tick(self, counter: int) -> bool:
        if self._signalled_at is not None and self._drain is None:
            self._drain = asyncio.create_task(self._run_drain(self._signalled_at + self.grace_s))
        return await super().on_tick(counter)

    async def _run_drain(self, deadline: float) -> None:
        self.gate.draining = True
        if self.on_drain is not None:
            await self.on_drain()
        if not await self.gate.wait_idle(deadline - time.monotonic()):
            log.warning("%d requests still in flight after %g s: ending them", self.gate.in_flight, self.grace_s)
            if self.on_timeout is not None:
                self.on_timeout()
            await self.gate.wait_idle(STRAGGLER_S)
        log.info("drained: shutting down")
        self.should_exit = True
