"""One prepared chat generation run as block events: what the Responses and Messages routes render from.

Both APIs translate their request into a chat request, `ChatServing.prepare` it (template, limits, sampling,
constraint, parsers) and run it here; streamed or not, the blocks come from the same parser deltas.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

from s1serve.serve.blocks import BlockBuilder, BlockEvent
from s1serve.serve.openai.errors import APIError
from s1serve.serve.openai.protocol import ChatCompletionRequest
from s1serve.serve.openai.serving import ChatServing, PreparedChat


async def prepare(chat: ChatServing, req: ChatCompletionRequest, reasoning_budget: int | None = None) -> BlockRun:
    """A translated request ready to run; a constraint that cannot be built (a bad tool schema) is a 400."""
    try:
        return BlockRun(await chat.prepare(req, reasoning_budget))
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


class BlockRun:
    """Runs a prepared single-choice chat generation, feeding its parsed deltas to a `BlockBuilder`."""

    def __init__(self, prepared: PreparedChat):
        self.prepared = prepared
        self.builder = BlockBuilder(lambda: prepared.gen.choices[0].parser.tool_calls)
        self.finish_reason: str | None = None  # the chat finish reason: tool_calls / stop / length / abort

    @property
    def request_id(self) -> str:
        return self.prepared.gen.request_id

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, if one did."""
        return self.prepared.gen.choices[0].stop_string

    def usage(self) -> dict:
        return self.prepared.usage()

    async def start(self) -> None:
        """Sends the request and waits for its first output, before a streamed response begins (Generation.start)."""
        await self.prepared.gen.start()

    async def events(self) -> AsyncIterator[BlockEvent]:
        gen = self.prepared.gen
        async with aclosing(gen.steps()) as steps:
            async for step in steps:
                for event in self.builder.feed(step.delta):
                    yield event
                if step.finish_reason is not None:
                    self.finish_reason = step.finish_reason
                    for event in self.builder.finish():
                        yield event

    async def run(self) -> None:
        """Runs to the end (a non-streamed response): the blocks are then in `builder`."""
        async for _ in self.events():
            pass
