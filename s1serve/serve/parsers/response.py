"""One response through both parsers: reasoning first, then tool calls in the content.

`ResponseParser` is made per request from the two per-request parsers (either may be None: no reasoning parser
configured, or no tools / `tool_choice="none"` in the request). `parse()` handles a whole response; `feed()` /
`flush()` a stream, giving OpenAI-shaped deltas. Both paths give the same reasoning, content and calls.
Without a tool parser, `<tool_call>` does not end the reasoning (the reasoning parser is rebuilt accordingly;
use `parser.reasoning.fresh()` for a probe with the same settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from s1serve.serve.parsers.reasoning import ReasoningParser
from s1serve.serve.parsers.tool_calls import (
    ContentDelta, ToolCall, ToolCallArgs, ToolCallParser, ToolCallStart, ToolEvent,
)


def final_finish_reason(engine_reason: str | None, has_tool_calls: bool) -> str | None:
    """'stop' becomes 'tool_calls' when the response made at least one call; 'length' and others are kept."""
    return "tool_calls" if has_tool_calls and engine_reason == "stop" else engine_reason


@dataclass(frozen=True)
class ParsedOutput:
    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None


@dataclass
class ToolCallDelta:
    """`choices[0].delta.tool_calls[i]`: id and name only in a call's first delta."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ResponseDelta:
    """What one piece of output added. `parts` holds the same content and call pieces as `content` and
    `tool_calls`, in the order the model wrote them (text after a call stays after it), for the APIs whose output
    is a list of blocks (Responses, Messages); reasoning always comes before all of them."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    parts: list[str | ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning_content or self.content or self.tool_calls)

    def then(self, later: ResponseDelta) -> ResponseDelta:
        """This delta followed by `later`, as one delta."""
        out = ResponseDelta(self.reasoning_content + later.reasoning_content, self.content + later.content)
        for call in self.tool_calls + later.tool_calls:
            out._add_call(call.index, call.id, call.name, call.arguments, out.tool_calls)
        for part in self.parts + later.parts:
            if isinstance(part, str):
                out._add_text(part)
            else:
                out._add_call(part.index, part.id, part.name, part.arguments, out.parts)
        return out

    def _add_text(self, text: str) -> None:
        if self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += text
        elif text:
            self.parts.append(text)

    @staticmethod
    def _add_call(index: int, id: str | None, name: str | None, arguments: str, into: list) -> None:
        last = into[-1] if into else None
        if id is None and isinstance(last, ToolCallDelta) and last.index == index:
            last.arguments += arguments
        else:
            into.append(ToolCallDelta(index, id, name, arguments))


@dataclass
class ResponseParser:
    reasoning: ReasoningParser | None = None
    tools: ToolCallParser | None = None

    def __post_init__(self) -> None:
        if self.reasoning is not None and self.tools is None and self.reasoning.ends_at_tool_call:
            # No tool parsing for this request: a <tool_call> is not a call, so it does not end the reasoning.
            self.reasoning = ReasoningParser(self.reasoning.starts_in_reasoning, ends_at_tool_call=False)

    # -- whole response --------------------------------------------------------------------------------------
    def parse(self, text: str, finish_reason: str | None = "stop") -> ParsedOutput:
        if self.reasoning is None:
            reasoning, content = None, text or None
        else:
            split = self.reasoning.split(text)
            reasoning, content = split.reasoning, split.content
        calls: list[ToolCall] = []
        if self.tools is not None and content is not None:
            content, calls = self.tools.parse(content)
        return ParsedOutput(reasoning, content, calls, final_finish_reason(finish_reason, bool(calls)))

    # -- stream ----------------------------------------------------------------------------------------------
    @property
    def content_start(self) -> int | None:
        """Offset in the output text where content begins (None while reasoning): search stop strings from here."""
        return 0 if self.reasoning is None else self.reasoning.content_start

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Calls completed so far in the stream."""
        return [] if self.tools is None else self.tools.calls

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return final_finish_reason(engine_reason, bool(self.tool_calls))

    def feed(self, delta: str) -> ResponseDelta:
        if self.reasoning is None:
            reasoning, content = "", delta
        else:
            reasoning, content = self.reasoning.feed(delta)
        return self._delta(reasoning, content, final=False)

    def flush(self) -> ResponseDelta:
        reasoning, content = ("", "") if self.reasoning is None else self.reasoning.flush()
        return self._delta(reasoning, content, final=True)

    def _delta(self, reasoning: str, content: str, final: bool) -> ResponseDelta:
        if self.tools is None:
            out = ResponseDelta(reasoning, content)
            out._add_text(content)
            return out
        events: list[ToolEvent] = self.tools.feed(content) if content else []
        if final:
            events += self.tools.flush()
        out = ResponseDelta(reasoning)
        for event in events:
            if isinstance(event, ContentDelta):
                out.content += event.text
                out._add_text(event.text)
            elif isinstance(event, ToolCallStart):
                for into in (out.tool_calls, out.parts):
                    into.append(ToolCallDelta(event.index, event.id, event.name))
            elif isinstance(event, ToolCallArgs):
                for into in (out.tool_calls, out.parts):
                    out._add_call(event.index, None, None, event.arguments, into)
        return out
