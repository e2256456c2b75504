"""The request body limit of the api_server and the proxy (--max-request-body-bytes, flag in serve/openai/arguments.py)."""

from __future__ import annotations

from typing import Any

from s1serve.serve.asgi_body import read_body, replay
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
        read = await read_body(receive, self.limit)
        if read is None:
            return await self._refuse(scope, receive, send)
        await self.app(scope, replay(read[0], receive), send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_for_route(scope.get("path", ""), 413, f"request body is larger than --max-request-body-bytes ({self.limit} bytes)")
        await response(scope, receive, send)
