"""Every error in the shape of the route that failed (Anthropic's on `/v1/messages*`, OpenAI's elsewhere), for
errors raised before a route runs (body checks, 404/405) as well as in it, and our own bugs as a JSON 500 that
leaves the keep-alive connection usable."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from s1serve.serve.anthropic.errors import error_response as anthropic_error_response
from s1serve.serve.openai.errors import APIError, error_response, validation_message

ANTHROPIC_PREFIX = "/v1/messages"
log = logging.getLogger("s1serve.api_server")


def error_for_route(
    path: str, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
    kind: str | None = None,
) -> JSONResponse:
    """`kind`: the OpenAI error type, when not the status's own (Anthropic's shape has its own table)."""
    if path.startswith(ANTHROPIC_PREFIX):
        return anthropic_error_response(status, message, headers)
    return error_response(status, message, param, kind=kind, headers=headers)


def _http_message(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return f"method {request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
    if exc.status_code == 404:
        return f"no route {request.url.path}"
    return str(exc.detail)


class ContainBugs:
    """ASGI middleware: an exception no handler took (our own bug) becomes a JSON 500 in the route's shape.

    Starlette's handler for `Exception` answers and then re-raises, which makes uvicorn drop the keep-alive
    connection; here the exception stops. Once a response has started (a stream cut midway) nothing but closing
    can tell the client, so the exception goes on."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            log.exception("unhandled error on %s", scope.get("path"))
            text = f"internal error ({type(exc).__name__}): {exc}".encode("utf-8", "replace").decode("utf-8")
            await error_for_route(scope.get("path", ""), 500, text)(scope, receive, send)


def install_error_handling(app: FastAPI) -> None:
    """The exception handlers and the bug guard of the api_server."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_for_route(request.url.path, exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = validation_message(exc)
        return error_for_route(request.url.path, 400, message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_for_route(request.url.path, exc.status_code, _http_message(request, exc), headers=exc.headers)

    app.add_middleware(ContainBugs)
