"""Refuses JSON bodies that hold an unpaired UTF-16 surrogate (`"\\ud800"`), naming the field.

JSON lets a body spell a lone surrogate as an escape; Python decodes it into a str that cannot be encoded as
UTF-8, so it would fail later in the tokenizer, the chat template or even in the error response that echoes it.
Checking the parsed body once, at the door, gives the client a 400 that names where the bad text is.
"""

from __future__ import annotations

import json
import re
from typing import Any

from s1serve.serve.openai.errors import error_response

# A surrogate can only reach Python through a \uD800-\uDFFF escape: raw UTF-8 cannot encode one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE = re.compile("[\ud800-\udfff]")


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """The JSON path (e.g. `messages[0].content`) of the first string holding an unpaired surrogate, else None."""
    if isinstance(value, str):
        return path or "body" if _LONE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if _LONE.search(str(key)):
                return where
            if (found := lone_surrogate_path(item, where)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := lone_surrogate_path(item, f"{path}[{i}]")) is not None:
                return found
    return None


def surrogate_error(body: bytes) -> str | None:
    """The error message for a body with an unpaired surrogate, or None (also for bodies that are not JSON:
    those get the framework's own 400)."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    field = lone_surrogate_path(parsed)
    if field is None:
        return None
    return f"{field}: holds an unpaired UTF-16 surrogate escape, which is not valid Unicode text"


class RejectLoneSurrogates:
    """ASGI middleware: reads a JSON body whole, answers 400 if it holds a lone surrogate, else replays it."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        messages, body = [], bytearray()
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        message_text = surrogate_error(bytes(body))
        if message_text is not None:
            field = message_text.split(":", 1)[0]
            return await error_response(400, message_text, field)(scope, receive, send)

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
