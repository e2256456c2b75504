"""Running one engine request: its n choices' engine text turned into parsed choice steps, with metrics.

A request that fails in the engine (its output carries an error, engine/isolation.py) or in its response parser
fails alone: APIError 500 naming the stage, which the routes answer as a JSON error or a stream's error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from s1serve.engine.admission import QueueFullError
from s1serve.engine.client import EngineDeadError
from s1serve.engine.isolation import fault_message
from s1serve.engine.media import MediaInput
from s1serve.engine.outputs import OutputDelta
from s1serve.layers.sampler import TokenLogprob
from s1serve.sampling_params import InvalidParameterError, SamplingParams
from s1serve.serve.openai.choice import ChoiceText
from s1serve.serve.openai.errors import APIError
from s1serve.serve.openai.prepare import ServingContext, busy_error
from s1serve.serve.parsers.response import ParsedOutput, ResponseDelta

log = logging.getLogger("s1serve.api_server")


@dataclass
class ChoiceStep:
    index: int
    delta: ResponseDelta
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # the choice's final reason (tool_calls / stop / length / abort) on its last step


@dataclass
class Generation:
    """One engine request (all n choices of one prompt) turned into parsed choice steps."""

    ctx: ServingContext
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    choices: list[ChoiceText]
    media: tuple[MediaInput, ...] = ()  # the prompt's processed images/videos
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache, as the engine reports them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first output, when the params ask for them
    _started: tuple[ChoiceStep, AsyncIterator[ChoiceStep]] | None = None  # start()'s first step and the rest

    def __post_init__(self) -> None:
        n = len(self.choices)
        self.token_ids = [[] for _ in range(n)]
        self.logprobs = [[] for _ in range(n)]
        self.finish_reasons = [None] * n
        if self.ctx.faults is not None:
            for choice in self.choices:
                choice.parser = self.ctx.faults.parser(self.prompt_ids, choice.parser)

    async def start(self) -> None:
        """Sends the request and waits for its first step. A streamed response calls this before it begins, so
        that a refusal (429), an invalid prompt (400) or a timeout before the first token is its HTTP status, not
        an error event in a stream already answered 200."""
        steps = self._steps()
        try:
            self._started = (await anext(steps), steps)
        except BaseException:
            await steps.aclose()  # aborts the engine request if it was sent
            raise

    async def close(self) -> None:
        """Ends a started request that will not be read (the engine aborts it)."""
        if self._started is not None:
            _, steps = self._started
            self._started = None
            await steps.aclose()

    async def steps(self) -> AsyncIterator[ChoiceStep]:
        """The request's steps (after start(), its first step and then the rest)."""
        first, steps = self._started if self._started is not None else (None, self._steps())
        self._started = None
        async with aclosing(steps):
            if first is not None:
                yield first
            async for step in steps:
                yield step

    async def _steps(self) -> AsyncIterator[ChoiceStep]:
        metrics = self.ctx.metrics
        start = time.monotonic()
        first_token_at = None
        media = (self.media,) if self.media else ()  # an engine client without media support is asked as before
        agen = self.ctx.engine.generate(self.prompt_ids, self.params, self.request_id, *media)
        try:
            async for out in _within(agen, self.ctx.request_timeout):
                i = out.index
                if out.prompt_logprobs is not None:
                    self.prompt_logprobs = out.prompt_logprobs
                if self.finish_reasons[i] is not None:
                    continue  # ended by a stop string while the engine still ran it (n > 1)
                if out.error is not None:
                    raise APIError(500, out.error)
                choice = self.choices[i]
                if out.token_ids and first_token_at is None:
                    first_token_at = time.monotonic()
                    metrics.ttft.observe(first_token_at - start)
                self.token_ids[i] += out.token_ids
                self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
                self.logprobs[i] += out.logprobs or []
                try:
                    delta = choice.push(out.text)
                    reason = "stop" if choice.stopped else out.finish_reason
                    if reason is not None:
                        delta = delta.then(choice.finish())
                        reason = choice.parser.finish_reason(reason)
                except Exception as exc:  # noqa: BLE001 - our parser's bug fails this request only
                    raise parser_failure(exc) from None
                if reason is not None:
                    self.finish_reasons[i] = reason
                yield ChoiceStep(i, delta, out.token_ids, out.logprobs, reason)
                if all(r is not None for r in self.finish_reasons):
                    break
        except InvalidParameterError as exc:
            raise APIError(400, str(exc), exc.param) from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from None
        except QueueFullError as exc:
            raise busy_error(exc) from None
        finally:
            await agen.aclose()  # aborts the engine request if it is still running
            generated = sum(map(len, self.token_ids))
            metrics.prompt_tokens.inc(len(self.prompt_ids))
            metrics.generation_tokens.inc(generated)
            elapsed = time.monotonic() - start
            metrics.e2e.observe(elapsed)
            if first_token_at is not None and generated > len(self.choices):
                metrics.tpot.observe((time.monotonic() - first_token_at) / (generated - len(self.choices)))

    async def run(self) -> None:
        async for _ in self.steps():
            pass

    def parsed(self, index: int) -> ParsedOutput:
        """Choice `index` parsed whole, once the run is over (non-streamed responses)."""
        try:
            return self.choices[index].parsed(self.finish_reasons[index])
        except Exception as exc:  # noqa: BLE001 - our parser's bug fails this request only
            raise parser_failure(exc) from None


def parser_failure(exc: Exception) -> APIError:
    log.error("a response parser failed", exc_info=exc)
    return APIError(500, fault_message("parser", exc))


async def _within(agen: AsyncIterator[OutputDelta], timeout: float | None) -> AsyncIterator[OutputDelta]:
    """`agen`'s items, or a 504 once `timeout` seconds (--request-timeout) have passed since the first was asked
    for; the engine request is then closed, which aborts it and frees its KV blocks."""
    if timeout is None:
        async for item in agen:
            yield item
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            item = await asyncio.wait_for(anext(agen), deadline - loop.time())
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise APIError(504, f"the request did not finish within --request-timeout ({timeout:g} s) and was "
                                "aborted") from None
        yield item
