"""The engine core loop of an engine process: requests in over ZeroMQ, one batched output message per client per step.

Sockets (both bound here; s1serve.entrypoints picks the addresses and starts the process):
- inputs (PULL): what API servers send: ("add", client, request_id, prompt_ids, params, fields), ("abort",
  request_id), ("stats", client, call_id). Messages are pickled, so a request may carry any extra fields
  (`fields`, passed to Engine.add_request as keywords: multimodal features with tensors need no new message).
- outputs (ROUTER): each API server's DEALER says HELLO once and is answered ("ready", info); after a step each
  client gets one message with all of its requests' deltas: ("deltas", [(request_id, deltas, done)]). Errors of
  one request (an invalid prompt) go the same way as ("error", request_id, param, message), a request refused by
  admission control (engine/admission.py) as ("busy", request_id, message); stats as ("stats", call_id,
  EngineStats).

A client that has gone away (its API server process died) cannot be routed to any more: its requests are
aborted, so their KV blocks are freed, and the engine goes on serving the other clients. Each step is timed on the
step clock (engine/step_clock.py), which API servers read for /health. The loop ends on SIGTERM
(open requests are dropped, the runner's other ranks stopped); a step that raises, or a runner failure (a TP/EP
follower died), ends the process with status 1, which every API server notices at once (and reads why from the death note).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from s1serve.engine.admission import QueueFullError
from s1serve.engine.engine import Engine
from s1serve.engine.outputs import OutputDelta
from s1serve.engine.step_clock import StepClock
from s1serve.engine.ticker import EngineTicker
from s1serve.sampling_params import InvalidParameterError

HELLO = b"hello"
DEATH_NOTE = "death"  # file beside the sockets: why the engine process ended, for the API servers' 503s
# Test-only: every step with work first sleeps this many seconds (a hung step, for the watchdog's tests).
TEST_STEP_SLEEP_ENV = "S1SERVE_TEST_STEP_SLEEP_S"

log = logging.getLogger("s1serve.engine_core")


class _Stop(Exception):
    """SIGTERM arrived."""


def encode(message: tuple[Any, ...]) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(frame: bytes) -> tuple[Any, ...]:
    return pickle.loads(frame)


@dataclass(frozen=True)
class EngineAddresses:
    """Where an engine process listens, and where it leaves the reason it died: all in one private folder."""

    folder: Path

    @property
    def inputs(self) -> str:
        return f"ipc://{self.folder / 'requests'}"

    @property
    def outputs(self) -> str:
        return f"ipc://{self.folder / 'outputs'}"

    @property
    def death_note(self) -> Path:
        return self.folder / DEATH_NOTE

    @property
    def step_clock(self) -> Path:
        return self.folder / "step-clock"


class EngineCore:
    def __init__(self, engine: Engine, addresses: EngineAddresses):
        self.engine = engine
        self.addresses = addresses
        self._context = zmq.Context()
        self._inputs = self._context.socket(zmq.PULL)
        self._inputs.bind(addresses.inputs)
        self._outputs = self._context.socket(zmq.ROUTER)
        self._outputs.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone client raises instead of vanishing
        self._outputs.setsockopt(zmq.SNDHWM, 0)  # a client that lags is queued for, never dropped nor waited on
        self._outputs.bind(addresses.outputs)
        self._poller = zmq.Poller()
        self._poller.register(self._inputs, zmq.POLLIN)
        self._poller.register(self._outputs, zmq.POLLIN)
        self._owners: dict[str, bytes] = {}  # request id -> the client (DEALER identity) that sent it
        self._clock = StepClock.shared(addresses.step_clock, create=True)
        self._test_step_sleep_s = float(os.environ.get(TEST_STEP_SLEEP_ENV, "0"))
        self.info = {"max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
                     "admission": engine.admission}

    def run(self) -> None:
        """Serves until SIGTERM; then drops open requests and stops the runner's other ranks."""
        engine = self.engine
        engine.runner.on_failure(self._exit_on_failure)
        previous = signal.signal(signal.SIGTERM, _raise_stop)
        ticker = EngineTicker(engine, self._clock, self._test_step_sleep_s)
        try:
            while True:
                self._receive(ticker.wait_s())
                deltas = ticker.tick()
                if deltas:
                    self._publish(deltas)
        except _Stop:
            log.info("SIGTERM: stopping the engine")
        except BaseException as exc:
            self._leave_death_note(f"the engine failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._context.destroy(linger=0)
            engine.shutdown()

    def _receive(self, wait_s: float | None) -> None:
        """Handles every message waiting, after waiting up to `wait_s` (None: without limit) for the first one."""
        if wait_s is None:
            self._poller.poll()
        elif wait_s > 0:
            self._poller.poll(wait_s * 1000)
        while True:
            handled = False
            try:
                identity, frame = self._outputs.recv_multipart(zmq.NOBLOCK)
                if frame == HELLO:
                    self._send(identity, ("ready", self.info))
                handled = True
            except zmq.Again:
                pass
            try:
                self._handle(decode(self._inputs.recv(zmq.NOBLOCK)))
                handled = True
            except zmq.Again:
                pass
            if not handled:
                return

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "add":
            _, client, request_id, prompt_ids, params, fields = message
            try:
                self.engine.admit(len(prompt_ids))
                self.engine.add_request(request_id, prompt_ids, params, **fields)
            except QueueFullError as exc:
                self._send(client, ("busy", request_id, str(exc)))
                return
            except ValueError as exc:
                param = exc.param if isinstance(exc, InvalidParameterError) else None
                self._send(client, ("error", request_id, param, str(exc)))
                return
            self._owners[request_id] = client
        elif kind == "abort":
            self._publish(self.engine.abort(message[1]))
        elif kind == "stats":
            _, client, call_id = message
            self._send(client, ("stats", call_id, self.engine.stats()))
        else:
            raise ValueError(f"unknown engine message {kind!r}")

    def _publish(self, deltas: list[OutputDelta]) -> None:
        """One message per client: each of its requests' deltas of this step, and whether the request is done."""
        by_request: dict[str, list[OutputDelta]] = defaultdict(list)
        for delta in deltas:
            by_request[delta.request_id].append(delta)
        by_client: dict[bytes, list[tuple[str, list[OutputDelta], bool]]] = defaultdict(list)
        for request_id, items in by_request.items():
            client = self._owners.get(request_id)
            if client is None:
                continue
            done = request_id not in self.engine.requests
            if done:
                del self._owners[request_id]
            by_client[client].append((request_id, items, done))
        for client, batch in by_client.items():
            self._send(client, ("deltas", batch))

    def _send(self, client: bytes, message: tuple[Any, ...]) -> None:
        try:
            self._outputs.send_multipart([client, encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._drop_client(client)

    def _drop_client(self, client: bytes) -> None:
        """The client's process is gone: its requests are aborted (their blocks freed), nobody reads them."""
        orphans = [r for r, owner in self._owners.items() if owner == client]
        log.warning("client %s is gone: aborting its %d requests", client.decode(errors="replace"), len(orphans))
        for request_id in orphans:
            del self._owners[request_id]
            self.engine.abort(request_id)

    def _exit_on_failure(self, error: BaseException) -> None:
        """A rank of the runner failed (from a supervising thread; the loop may be stuck in a collective)."""
        log.error("the engine's runner failed: %s", error)
        self._leave_death_note(str(error))
        logging.shutdown()
        os._exit(1)

    def _leave_death_note(self, reason: str) -> None:
        staging = self.addresses.death_note.with_suffix(".tmp")
        staging.write_text(reason)
        staging.rename(self.addresses.death_note)  # whole or absent for a reader


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop()
