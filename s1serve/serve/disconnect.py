"""A client that disconnects cancels its request's handler, streamed or not.

Nothing reads a connection while a non-streamed handler awaits its result, so the ASGI server's `http.disconnect`
would go unseen until the whole generation had run (and a client's timeout-and-retry would multiply the work).
Once the request body has been read, this middleware itself waits for the next ASGI message, which can only be
the disconnect, and cancels the handler's task when it comes before the response has been sent. The cancellation
unwinds through the handler: the engine request is aborted as its stream closes (Generation.steps) and the
request is counted as an abort (ServerMetrics.counted). The handler's own later `receive()` calls (a streaming
response listens for the disconnect too) get the same message. As vLLM's `with_cancellation`, it does not poll
`request.is_disconnected()`, which middlewares that read the body hide.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


class CancelOnDisconnect:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_read = asyncio.Event()
        gone = asyncio.Event()
        sent = False  # the response's last byte has been handed to the server

        async def app_receive() -> Message:
            if body_read.is_set():
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal sent
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                sent = True

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait((handler, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not handler.done() and not sent:
                handler.cancel()
            await asyncio.wait((handler,))
        finally:
            watcher.cancel()
            handler.cancel()  # a no-op unless this task itself was cancelled (the server is shutting down)
            with suppress(asyncio.CancelledError):
                await watcher
        if not handler.cancelled():
            handler.result()  # the handler's own exception, if it raised one, goes on to the server
