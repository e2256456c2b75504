"""Reading an ASGI request body whole before the app does, then handing the same messages on to it: what the body
checks at the door (body_limit.py, json_body.py) share."""

from __future__ import annotations

from typing import Awaitable, Callable

Receive = Callable[[], Awaitable[dict]]


async def read_body(receive: Receive, limit: int | None = None) -> tuple[list[dict], bytes] | None:
    """The request's ASGI messages and its body; None as soon as the body passes `limit` bytes."""
    messages: list[dict] = []
    body = bytearray()
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if limit is not None and len(body) > limit:
            return None
        if not message.get("more_body", False):
            break
    return messages, bytes(body)


def replay(messages: list[dict], receive: Receive) -> Receive:
    """A receive for the app: the messages already read, then the connection's own."""
    async def replayed() -> dict:
        return messages.pop(0) if messages else await receive()

    return replayed

