"""EngineClient: everything the HTTP server asks of an engine. AsyncEngine (the engine loop in a thread of this
process) implements it; an engine in another process can stand behind the same interface."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from s1serve.engine.engine import EngineStats
from s1serve.engine.media import MediaInput
from s1serve.engine.outputs import OutputDelta
from s1serve.engine.step_clock import RunningStep
from s1serve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error (or was shut down); no request can be served any more."""


class EngineClient(Protocol):
    max_model_len: int  # prompt + output tokens a request may have
    vocab_size: int  # the model's vocabulary (token ids 0..vocab_size - 1)

    @property
    def errored(self) -> bool: ...

    @property
    def error(self) -> BaseException | None:
        """Why the engine is dead (None while it lives)."""

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """Calls `callback(error)` once when the engine dies (at once if it is dead already)."""

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, media: Sequence[MediaInput] = ()
    ) -> AsyncIterator[OutputDelta]:
        """The request's deltas until every sample has finished; closing the iterator aborts the request. `media`:
        the prompt's processed images/videos (plain tensors and ints), whose features replace its pad tokens."""

    def check_admission(self) -> None:
        """QueueFullError when this client's open requests already fill the engine's admission limits: a refusal
        that does not wait on the engine (engine/admission.py)."""

    def abort(self, request_id: str) -> None: ...

    def running_step(self) -> RunningStep | None:
        """The engine step running now (None while idle), read without waiting for the engine: for /health."""

    async def stats(self) -> EngineStats: ...

    def close(self) -> None:
        """Ends open requests and stops the engine (and its runner's other ranks)."""
