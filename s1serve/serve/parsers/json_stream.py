"""Incremental JSON reading with canonical re-serialisation, for streamed tool-call arguments.

`JsonReader` reads one JSON object from text given in pieces of any size and reports what it saw as events;
`CanonicalWriter` turns those events back into text, piece by piece, that is exactly what
`json.dumps(obj, ensure_ascii=False)` gives for the object `json.loads(text, strict=False)` reads (key order
kept; a repeated key is kept twice rather than collapsed). Because every byte is produced as soon as it is certain,
argument deltas can be streamed while the model writes and still add up to the non-streamed arguments string.

Accepted: RFC 8259 JSON, plus raw control characters inside strings (models write literal newlines in code).
Rejected (`JsonError`): NaN/Infinity, numbers that overflow a float, lone UTF-16 surrogates (they cannot be sent
as UTF-8), and anything but an object at the top level.
"""

from __future__ import annotations

import json
import math
import re
from enum import IntEnum

WHITESPACE = " \t\n\r"
_PLAIN_RUN = re.compile(r'[^"\\\ud800-\udfff]+')
_WS_RUN = re.compile(r"[ \t\n\r]+")
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS = {"t": "true", "f": "false", "n": "null"}


class JsonError(ValueError):
    """The text is not (the start of) a JSON object this reader accepts."""


class Ev(IntEnum):
    """What the reader saw. KEY carries the whole key; STR_CHARS a decoded run; SCALAR the canonical text."""

    OBJ_START = 0
    OBJ_END = 1
    ARR_START = 2
    ARR_END = 3
    KEY = 4
    STR_START = 5
    STR_CHARS = 6
    STR_END = 7
    SCALAR = 8


Event = tuple[Ev, str]

# container states
_KEY_OR_END, _KEY, _COLON, _VALUE, _VALUE_OR_END, _COMMA_OR_END = range(6)


def _canonical_number(text: str) -> str:
    if not _NUMBER.fullmatch(text):
        raise JsonError(f"bad number {text!r}")
    try:
        if _INT.fullmatch(text):
            return repr(int(text))
        value = float(text)
    except ValueError as exc:  # more digits than int() accepts
        raise JsonError(str(exc)) from None
    if not math.isfinite(value):
        raise JsonError(f"number out of range {text!r}")
    return repr(value)


class JsonReader:
    """Reads one JSON object incrementally. `feed` consumes text up to the end of the object."""

    def __init__(self) -> None:
        self.done = False
        self._events: list[Event] = []
        self._stack: list[list[int]] = []  # [is_array, state]
        self._started = False
        # lexer state
        self._in_string = False
        self._string_is_key = False
        self._key_parts: list[str] = []
        self._escape: str | None = None  # None: not in an escape; "": after "\"; "u...": collecting hex
        self._high_surrogate: int | None = None
        self._number: str | None = None
        self._literal: str | None = None

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def feed(self, text: str, pos: int = 0) -> int:
        """Read text[pos:]; return the index just past the object's closing brace, or len(text)."""
        n = len(text)
        while pos < n and not self.done:
            if self._in_string:
                pos = self._string(text, pos)
                continue
            ch = text[pos]
            if self._number is not None:
                if ch in _NUMBER_CHARS:
                    self._number += ch
                    pos += 1
                    continue
                number, self._number = self._number, None
                self._scalar(_canonical_number(number))
                continue  # the terminator is read as structure below
            if self._literal is not None:
                self._literal += ch
                pos += 1
                target = _LITERALS[self._literal[0]]
                if self._literal == target:
                    self._literal = None
                    self._scalar(target)
                elif not target.startswith(self._literal):
                    raise JsonError(f"bad literal {self._literal!r}")
                continue
            ws = _WS_RUN.match(text, pos)
            if ws:
                pos = ws.end()
                continue
            self._structure(ch)
            pos += 1
        return pos

    # -- structure -------------------------------------------------------------------------------------------
    def _structure(self, ch: str) -> None:
        if not self._started:
            if ch != "{":
                raise JsonError("a tool call must be a JSON object")
            self._started = True
            self._open(False, Ev.OBJ_START)
            return
        top = self._stack[-1]
        is_array, state = top
        if state in (_VALUE, _VALUE_OR_END):
            if ch == "]" and state == _VALUE_OR_END:
                self._close(Ev.ARR_END)
            else:
                self._value_start(ch)
        elif state in (_KEY_OR_END, _KEY):
            if ch == '"':
                self._in_string, self._string_is_key = True, True
            elif ch == "}" and state == _KEY_OR_END:
                self._close(Ev.OBJ_END)
            else:
                raise JsonError(f"expected a key, got {ch!r}")
        elif state == _COLON:
            if ch != ":":
                raise JsonError(f"expected ':', got {ch!r}")
            top[1] = _VALUE
        else:  # _COMMA_OR_END
            if ch == ",":
                top[1] = _VALUE if is_array else _KEY
            elif ch == ("]" if is_array else "}"):
                self._close(Ev.ARR_END if is_array else Ev.OBJ_END)
            else:
                raise JsonError(f"expected ',' or a closing bracket, got {ch!r}")

    def _value_start(self, ch: str) -> None:
        if ch == "{":
            self._open(False, Ev.OBJ_START)
        elif ch == "[":
            self._open(True, Ev.ARR_START)
        elif ch == '"':
            self._in_string, self._string_is_key = True, False
            self._events.append((Ev.STR_START, ""))
        elif ch == "-" or ch.isascii() and ch.isdigit():
            self._number = ch
        elif ch in _LITERALS:
            self._literal = ch
        else:
            raise JsonError(f"expected a value, got {ch!r}")

    def _open(self, is_array: bool, event: Ev) -> None:
        self._events.append((event, ""))
        self._stack.append([is_array, _VALUE_OR_END if is_array else _KEY_OR_END])

    def _close(self, event: Ev) -> None:
        self._stack.pop()
        self._events.append((event, ""))
        self._value_done()

    def _scalar(self, text: str) -> None:
        self._events.append((Ev.SCALAR, text))
        self._value_done()

    def _value_done(self) -> None:
        if self._stack:
            self._stack[-1][1] = _COMMA_OR_END
        else:
            self.done = True

    # -- strings ---------------------------------------------------------------------------------------------
    def _chars(self, s: str) -> None:
        if self._high_surrogate is not None:
            raise JsonError("lone UTF-16 surrogate")
        if self._string_is_key:
            self._key_parts.append(s)
        else:
            self._events.append((Ev.STR_CHARS, s))

    def _string(self, text: str, pos: int) -> int:
        if self._escape is None:
            run = _PLAIN_RUN.match(text, pos)
            if run:
                self._chars(run.group())
                return run.end()
            ch = text[pos]
            if ch == "\\":
                self._escape = ""
            elif ch == '"':
                if self._high_surrogate is not None:
                    raise JsonError("lone UTF-16 surrogate")
                self._in_string = False
                if self._string_is_key:
                    key, self._key_parts = "".join(self._key_parts), []
                    self._events.append((Ev.KEY, key))
                    self._stack[-1][1] = _COLON
                else:
                    self._events.append((Ev.STR_END, ""))
                    self._value_done()
            else:
                raise JsonError("lone UTF-16 surrogate")
            return pos + 1
        ch = text[pos]
        if self._escape == "":
            if ch == "u":
                self._escape = "u"
            elif ch in _SIMPLE_ESCAPES:
                self._escape = None
                self._chars(_SIMPLE_ESCAPES[ch])
            else:
                raise JsonError(f"bad escape \\{ch}")
            return pos + 1
        if ch not in "0123456789abcdefABCDEF":
            raise JsonError("bad \\u escape")
        self._escape += ch
        if len(self._escape) == 5:
            code = int(self._escape[1:], 16)
            self._escape = None
            if 0xD800 <= code <= 0xDBFF:
                if self._high_surrogate is not None:
                    raise JsonError("lone UTF-16 surrogate")
                self._high_surrogate = code
            elif 0xDC00 <= code <= 0xDFFF:
                if self._high_surrogate is None:
                    raise JsonError("lone UTF-16 surrogate")
                high, self._high_surrogate = self._high_surrogate, None
                self._chars(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)))
            else:
                self._chars(chr(code))
        return pos + 1


class CanonicalWriter:
    """Events in, `json.dumps(..., ensure_ascii=False)` text out, one piece per event."""

    def __init__(self) -> None:
        self._stack: list[list[bool]] = []  # [is_array, first]
        self._after_key = False

    def _sep(self) -> str:
        if self._after_key:
            self._after_key = False
            return ""
        if not self._stack:
            return ""
        top = self._stack[-1]
        if top[1]:
            top[1] = False
            return ""
        return ", "

    def write(self, event: Ev, data: str) -> str:
        if event is Ev.STR_CHARS:
            return json.dumps(data, ensure_ascii=False)[1:-1]
        if event is Ev.KEY:
            top = self._stack[-1]
            sep = "" if top[1] else ", "
            top[1] = False
            self._after_key = True
            return sep + json.dumps(data, ensure_ascii=False) + ": "
        if event is Ev.STR_END:
            return '"'
        if event is Ev.OBJ_END:
            self._stack.pop()
            return "}"
        if event is Ev.ARR_END:
            self._stack.pop()
            return "]"
        sep = self._sep()
        if event is Ev.OBJ_START or event is Ev.ARR_START:
            self._stack.append([event is Ev.ARR_START, True])
            return sep + ("[" if event is Ev.ARR_START else "{")
        if event is Ev.STR_START:
            return sep + '"'
        return sep + data  # SCALAR
