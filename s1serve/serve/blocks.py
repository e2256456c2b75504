"""A response as an ordered list of blocks (reasoning, text, tool call), built from the parsers' deltas.

The Responses API (output items) and the Messages API (content blocks) both present a response as blocks in
the order the model wrote them. `BlockBuilder` turns the `ResponseDelta`s that the chat path's parsers give
(serve/parsers) into block events (start, delta, stop) and keeps the blocks. A non-streamed response is the same
builder fed the same deltas, so streamed and whole responses agree however the output was cut: the tool-call and
reasoning rules live only in the parsers.

A block is open until a block of another kind (or another call) starts, or the response ends. A call that was
announced and then failed (its text came back as content, see docs/api.md "Streaming") stays in the stream it was
sent in but is left out of `final_blocks()` (as it is left out of a non-streamed chat completion).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from s1serve.serve.parsers.response import ResponseDelta
from s1serve.serve.parsers.tool_calls import ToolCall

REASONING, TEXT, TOOL_CALL = "reasoning", "text", "tool_call"


@dataclass
class Block:
    kind: str  # REASONING | TEXT | TOOL_CALL
    text: str = ""  # the reasoning or text, or the call's arguments (canonical JSON) so far
    call_id: str | None = None
    name: str | None = None
    call_index: int | None = None
    completed: bool = True  # False for an announced call whose block then failed (known once it is closed)


@dataclass(frozen=True)
class BlockStart:
    index: int
    block: Block  # kind, call_id and name are final; text grows with later deltas


@dataclass(frozen=True)
class BlockDelta:
    index: int
    text: str


@dataclass(frozen=True)
class BlockStop:
    index: int


BlockEvent = BlockStart | BlockDelta | BlockStop


class BlockBuilder:
    """`completed_calls` gives the calls the parser has completed so far (`ResponseParser.tool_calls`): a call
    block is marked when it closes, which happens only once the parser has ended the call one way or the other."""

    def __init__(self, completed_calls: Callable[[], list[ToolCall]]) -> None:
        self.blocks: list[Block] = []
        self._open: int | None = None
        self._completed_calls = completed_calls

    def feed(self, delta: ResponseDelta) -> list[BlockEvent]:
        events: list[BlockEvent] = []
        if delta.reasoning_content:
            self._write(REASONING, delta.reasoning_content, events)
        for part in delta.parts:
            if isinstance(part, str):
                self._write(TEXT, part, events)
            elif part.id is not None:
                self._start(Block(TOOL_CALL, "", part.id, part.name, part.index), events)
                self._append(part.arguments, events)
            else:
                current = self.blocks[self._open] if self._open is not None else None
                if current is None or current.kind != TOOL_CALL or current.call_index != part.index:
                    raise ValueError(f"arguments for tool call {part.index}, which is not the open block")
                self._append(part.arguments, events)
        return events

    def finish(self) -> list[BlockEvent]:
        """The end of the response: closes the open block."""
        events: list[BlockEvent] = []
        self._close(events)
        return events

    def final_blocks(self) -> list[Block]:
        """The blocks of the finished response: all but announced calls that did not complete."""
        return [block for block in self.blocks if block.completed]

    def _write(self, kind: str, text: str, events: list[BlockEvent]) -> None:
        current = self.blocks[self._open] if self._open is not None else None
        if current is None or current.kind != kind:
            self._start(Block(kind), events)
        self._append(text, events)

    def _start(self, block: Block, events: list[BlockEvent]) -> None:
        self._close(events)
        self.blocks.append(block)
        self._open = len(self.blocks) - 1
        events.append(BlockStart(self._open, block))

    def _append(self, text: str, events: list[BlockEvent]) -> None:
        if text:
            assert self._open is not None
            self.blocks[self._open].text += text
            events.append(BlockDelta(self._open, text))

    def _close(self, events: list[BlockEvent]) -> None:
        if self._open is not None:
            block = self.blocks[self._open]
            if block.kind == TOOL_CALL:
                block.completed = any(call.id == block.call_id for call in self._completed_calls())
            events.append(BlockStop(self._open))
            self._open = None
