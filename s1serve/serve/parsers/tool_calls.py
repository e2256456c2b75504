"""Tool-call parser: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks become OpenAI tool calls.

One `ToolCallParser` per request: `parse(text)` for a whole response, `feed(delta)` / `flush()` for a stream.
Both run the same state machine, so a response parsed whole and the same response fed in any pieces give the
same content and the same calls. Rules (docs/api.md, "Reasoning and tool calls"):

- A block is `<tool_call>`, optional whitespace, one JSON object, optional whitespace, `</tool_call>`. The object
  needs a string `name`; `arguments` (or `parameters`) is an object, a string holding a JSON object, null or absent
  (both meaning `{}`). Other keys are ignored.
- `arguments` comes back as the canonical `json.dumps(obj, ensure_ascii=False)` text; streamed argument fragments
  concatenate to exactly that text.
- A block that fails (bad JSON, no/empty name, a name not among `tool_names`, no `</tool_call>` before the end) is
  content, verbatim: from its `<tool_call>` up to and including the first `</tool_call>` after it, or up to the
  next `<tool_call>` if that comes first, or to the end of the text.
- Newlines ("\n") right before a successful block are dropped, and so are those right after one when no content
  comes before it or nothing but newlines and calls come after it (the chat template renders content, "\n", then
  the calls, one per line). All other text is content, verbatim: "A\n<call>\nB" gives content "A\nB".
- `parallel_tool_calls=False` keeps the first successful call; later successful blocks are dropped.
- Streaming announces a call (index, id, name) once its name is read and allowed, then streams argument fragments.
  If such a block then fails, a `ToolCallAbort` follows and the block's text comes back as content: the one case
  where a stream shows more than the whole response (an announced, unfinished call).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from s1serve.serve.parsers.json_stream import CanonicalWriter, Ev, Event, JsonError, JsonReader, WHITESPACE

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    """An OpenAI-style tool call id: 'call_' and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


def partial_tag_suffix(text: str, *tags: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (what to hold back)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # canonical JSON text of an object


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    index: int
    arguments: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    call: ToolCall


@dataclass(frozen=True)
class ToolCallAbort:
    """A call announced by `ToolCallStart` whose block then failed; its text follows as content."""

    index: int


ToolEvent = ContentDelta | ToolCallStart | ToolCallArgs | ToolCallEnd | ToolCallAbort


class _Block:
    """One `<tool_call>` block being read: the JSON object, then whitespace and `</tool_call>`."""

    def __init__(self) -> None:
        self.raw: list[str] = [TOOL_CALL_START]
        self.reader = JsonReader()
        self.closed = False
        self._close_matched = 0
        self._depth = 0  # of the outer object's events
        self._route: str | None = None  # "name" | "args" | "skip" while reading a top-level value
        self._vdepth = 0
        self._name_parts: list[str] | None = None
        self.name: str | None = None
        self._args_seen = False
        self._args_mode: str | None = None  # "obj" | "str"
        self._writer = CanonicalWriter()
        self._inner: JsonReader | None = None
        self.args: list[str] = []  # canonical fragments
        # set by the parser
        self.checked = False
        self.announced = False
        self.suppressed = False
        self.index = -1
        self.id = ""
        self.sent = 0

    def feed(self, text: str) -> int:
        """Read text; return how much was consumed (less than all only when `</tool_call>` closed the block).

        Raises JsonError when the block fails; then nothing of `text` is recorded in `raw`.
        """
        pos = 0
        while pos < len(text) and not self.closed:
            if not self.reader.done:
                pos = self.reader.feed(text, pos)
                for event in self.reader.take_events():
                    self._event(event)
                continue
            ch = text[pos]
            if self._close_matched == 0 and ch in WHITESPACE:
                pos += 1
            elif ch == TOOL_CALL_END[self._close_matched]:
                self._close_matched += 1
                pos += 1
                self.closed = self._close_matched == len(TOOL_CALL_END)
            else:
                raise JsonError(f"expected {TOOL_CALL_END} after the JSON object")
        self.raw.append(text[:pos])
        return pos

    def _event(self, event: Event) -> None:
        kind, data = event
        if self._depth == 0:  # the reader only starts with OBJ_START
            self._depth = 1
            return
        if self._route is None:
            if kind is Ev.OBJ_END:
                self._depth = 0
                if self.name is None:
                    raise JsonError("tool call without a name")
                if not self._args_seen:
                    self.args.append("{}")
                return
            # kind is Ev.KEY
            if data == "name":
                if self._name_parts is not None:
                    raise JsonError("two names")
                self._name_parts = []
                self._route = "name"
            elif data in ARGUMENT_KEYS:
                if self._args_seen:
                    raise JsonError("two argument objects")
                self._args_seen = True
                self._route = "args"
            else:
                self._route = "skip"
            self._vdepth = 0
            return
        if kind in (Ev.OBJ_START, Ev.ARR_START):
            self._vdepth += 1
        elif kind in (Ev.OBJ_END, Ev.ARR_END):
            self._vdepth -= 1
        if self._route == "name":
            self._name_event(kind, data)
        elif self._route == "args":
            self._args_event(kind, data)
        if self._vdepth == 0 and kind in (Ev.SCALAR, Ev.STR_END, Ev.OBJ_END, Ev.ARR_END):
            self._route = None

    def _name_event(self, kind: Ev, data: str) -> None:
        assert self._name_parts is not None
        if kind is Ev.STR_CHARS:
            self._name_parts.append(data)
        elif kind is Ev.STR_END:
            self.name = "".join(self._name_parts)
        elif kind is not Ev.STR_START:
            raise JsonError("the name must be a string")

    def _args_event(self, kind: Ev, data: str) -> None:
        if self._args_mode is None:
            if kind is Ev.OBJ_START:
                self._args_mode = "obj"
            elif kind is Ev.STR_START:
                self._args_mode = "str"
                self._inner = JsonReader()
                return
            elif kind is Ev.SCALAR and data == "null":
                self.args.append("{}")
                return
            else:
                raise JsonError("arguments must be an object or a JSON string of one")
        if self._args_mode == "obj":
            self.args.append(self._writer.write(kind, data))
            return
        inner = self._inner
        assert inner is not None
        if kind is Ev.STR_CHARS:
            pos = inner.feed(data)
            for event in inner.take_events():
                self.args.append(self._writer.write(*event))
            if pos < len(data) and data[pos:].strip(WHITESPACE):
                raise JsonError("text after the arguments object")
        elif kind is Ev.STR_END and not inner.done:
            raise JsonError("arguments string is not a complete JSON object")


@dataclass
class ToolCallParser:
    """Per-request tool-call parser. `tool_names=None` accepts any name; otherwise only these."""

    tool_names: Collection[str] | None = None
    parallel_tool_calls: bool = True
    id_factory: Callable[[], str] = new_call_id
    calls: list[ToolCall] = field(default_factory=list, init=False)  # successful calls so far
    _buf: str = field(default="", init=False, repr=False)
    _mode: str = field(default="text", init=False, repr=False)  # "text" | "block" | "literal"
    _block: _Block | None = field(default=None, init=False, repr=False)
    _held_nl: str = field(default="", init=False, repr=False)
    _after_call: bool = field(default=False, init=False, repr=False)  # no content since the last call
    _emitted: bool = field(default=False, init=False, repr=False)  # some content was given out
    _next_index: int = field(default=0, init=False, repr=False)
    _out: list[ToolEvent] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tool_names is not None:
            self.tool_names = frozenset(self.tool_names)

    # -- public ----------------------------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Whole response: (content or None when empty, successful calls). Does not touch this instance's stream."""
        fresh = ToolCallParser(self.tool_names, self.parallel_tool_calls, self.id_factory)
        events = fresh.feed(text) + fresh.flush()
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        return content or None, fresh.calls

    def feed(self, delta: str) -> list[ToolEvent]:
        self._buf += delta
        self._run(final=False)
        return self._take()

    def flush(self) -> list[ToolEvent]:
        """End of the stream: an unterminated block becomes content; held-back text is released."""
        self._run(final=True)
        return self._take()

    # -- machine ---------------------------------------------------------------------------------------------
    def _take(self) -> list[ToolEvent]:
        merged: list[ToolEvent] = []
        for event in self._out:
            last = merged[-1] if merged else None
            if isinstance(event, ContentDelta) and isinstance(last, ContentDelta):
                merged[-1] = ContentDelta(last.text + event.text)
            elif isinstance(event, ToolCallArgs) and isinstance(last, ToolCallArgs) and last.index == event.index:
                merged[-1] = ToolCallArgs(event.index, last.arguments + event.arguments)
            else:
                merged.append(event)
        self._out = []
        return merged

    def _content(self, text: str) -> None:
        if text:
            self._out.append(ContentDelta(text))
            self._emitted = True
            self._after_call = False

    def _text(self, text: str) -> None:
        """Plain text outside blocks: hold trailing newlines back until we know what follows them."""
        if self._after_call and not self._emitted:
            text = text.lstrip("\n")
        text = self._held_nl + text
        body = text.rstrip("\n")
        self._held_nl = text[len(body):]
        self._content(body)

    def _run(self, final: bool) -> None:
        while True:
            if self._mode == "text":
                i = self._buf.find(TOOL_CALL_START)
                if i < 0:
                    keep = 0 if final else partial_tag_suffix(self._buf, TOOL_CALL_START)
                    cut = len(self._buf) - keep
                    self._text(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    if final:
                        if not self._after_call:
                            self._content(self._held_nl)
                        self._held_nl = ""
                    return
                self._text(self._buf[:i])
                self._buf = self._buf[i + len(TOOL_CALL_START):]
                self._block = _Block()
                self._mode = "block"
            elif self._mode == "block":
                block = self._block
                assert block is not None
                try:
                    used = block.feed(self._buf)
                    self._buf = self._buf[used:]
                    self._announce(block)
                except JsonError:
                    self._fail(block)
                    continue
                if block.closed:
                    self._finish(block)
                elif final:
                    self._fail(block)
                else:
                    return
            else:  # literal: the text of a failed block
                end = self._buf.find(TOOL_CALL_END)
                start = self._buf.find(TOOL_CALL_START)
                if start >= 0 and (end < 0 or start < end):
                    self._content(self._buf[:start])
                    self._buf = self._buf[start:]
                    self._mode = "text"
                elif end >= 0:
                    cut = end + len(TOOL_CALL_END)
                    self._content(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    self._mode = "text"
                else:
                    keep = 0 if final else partial_tag_suffix(self._buf, TOOL_CALL_END, TOOL_CALL_START)
                    cut = len(self._buf) - keep
                    self._content(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return

    def _announce(self, block: _Block) -> None:
        if block.name is not None and not block.checked:
            block.checked = True
            if not block.name or (self.tool_names is not None and block.name not in self.tool_names):
                raise JsonError(f"unknown tool {block.name!r}")
            if not self.parallel_tool_calls and self.calls:
                block.suppressed = True
            else:
                block.announced = True
                block.index = self._next_index
                self._next_index += 1
                block.id = self.id_factory()
                self._out.append(ToolCallStart(block.index, block.id, block.name))
        if block.announced and block.sent < len(block.args):
            self._out.append(ToolCallArgs(block.index, "".join(block.args[block.sent:])))
            block.sent = len(block.args)

    def _finish(self, block: _Block) -> None:
        self._block = None
        self._mode = "text"
        self._held_nl = ""
        self._after_call = True
        if block.suppressed:
            return
        assert block.name is not None
        call = ToolCall(block.id, block.name, "".join(block.args))
        self.calls.append(call)
        self._out.append(ToolCallEnd(block.index, call))

    def _fail(self, block: _Block) -> None:
        if block.announced:
            self._out.append(ToolCallAbort(block.index))
        self._content(self._held_nl + TOOL_CALL_START)
        self._held_nl = ""
        self._buf = "".join(block.raw)[len(TOOL_CALL_START):] + self._buf
        self._block = None
        self._mode = "literal"
