"""The check every JSON request body passes before a route reads it.

A body must be a JSON object in strict JSON (RFC 8259), encoded as UTF-8: no `NaN` / `Infinity` literals, no
number beyond a double's range (Python's parser reads both as floats that no sampling field accepts), nesting at
most MAX_DEPTH deep (a deeper body would end in a RecursionError somewhere downstream), and no unpaired UTF-16
surrogate escape (`"\\ud800"`: Python decodes it into a str that cannot be encoded as UTF-8, so it would fail later
in the tokenizer, the chat template or the error that echoes it). Each failure is a 400 (415 for another content
type) that names where the problem is.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from s1serve.serve.asgi_body import read_body, replay
from s1serve.serve.route_errors import error_for_route

MAX_DEPTH = 64
# A surrogate can only reach Python through a \uD800-\uDFFF escape: raw UTF-8 cannot encode one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE = re.compile("[\ud800-\udfff]")


class BodyError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def _constant(name: str) -> float:
    raise BodyError(400, f"request body is not valid JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(400, f"request body holds the number {text[:40]}, which is beyond the range of a double")
    return value


def _kind(value: Any) -> str:
    return {str: "a string", list: "an array", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _check_tree(body: dict, surrogates: bool) -> None:
    """Nesting depth and (when the raw body has a surrogate escape) unpaired surrogates, walked without recursion."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if _LONE.search(value):
                where = path or "body"
                raise BodyError(400, f"{where}: holds an unpaired UTF-16 surrogate escape, which is not valid Unicode text", where)
            continue
        if depth > MAX_DEPTH:
            raise BodyError(400, f"{path}: JSON nested deeper than {MAX_DEPTH} levels", path)
        if isinstance(value, dict):
            for key, item in value.items():
                if surrogates and _LONE.search(key):  # the key cannot be echoed: name the object that holds it
                    where = path or "body"
                    raise BodyError(400, f"{where}: a key holds an unpaired UTF-16 surrogate escape", where)
                where = f"{path}.{key}" if path else str(key)
                if isinstance(item, (dict, list)) or (surrogates and isinstance(item, str)):
                    stack.append((item, where, depth + 1))
        else:
            for i, item in enumerate(value):
                if isinstance(item, (dict, list)) or (surrogates and isinstance(item, str)):
                    stack.append((item, f"{path}[{i}]", depth + 1))


def parse_json_body(body: bytes, content_type: str | None) -> dict:
    """The body as a JSON object, or BodyError naming what is wrong with it."""
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise BodyError(415, f"Content-Type {media or '(empty)'!r} is not supported: send the body as application/json")
    if not body.strip():
        raise BodyError(400, "request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at offset {exc.start}") from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite)
    except RecursionError:
        raise BodyError(400, f"request body is JSON nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BodyError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(value, dict):
        raise BodyError(400, f"request body must be a JSON object, got {_kind(value)}")
    _check_tree(value, surrogates=_SURROGATE_ESCAPE.search(body) is not None)
    return value


class CheckJSONBody:
    """ASGI middleware: reads the body of a POST to one of `paths` whole, answers the route's error if it fails
    parse_json_body, else replays it to the app (which parses it again: the check keeps no state)."""

    def __init__(self, app: Any, paths: frozenset[str]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        read = await read_body(receive)
        assert read is not None  # no limit given
        messages, body = read
        content_type = dict(scope.get("headers", [])).get(b"content-type")
        try:
            parse_json_body(body, None if content_type is None else content_type.decode("latin-1"))
        except BodyError as exc:
            return await error_for_route(scope["path"], exc.status, exc.message, exc.param)(scope, receive, send)
        await self.app(scope, replay(messages, receive), send)
