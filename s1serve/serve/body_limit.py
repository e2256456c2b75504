"""The request body limit of the api_server and the proxy (--max-request-body-bytes, flag in serve/openai/arguments.py)."""

from __future__ import annotations

from typing import Any

from s1serve.serve.route_errors import error_for_route


class BodySizeLimit:
    """ASGI middleware: a body over the limit is answered 413 before it is read whole (chunked bodies too)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        body = bytearray()
        more = True
        messages = []
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_for_route(scope.get("path", ""), 413, f"request body is larger than --max-request-body-bytes ({self.limit} bytes)")
        await response(scope, receive, send)
