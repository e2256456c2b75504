"""Errors answered before a route runs (auth, drain): in the shape of the route's API."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from s1serve.serve.anthropic.errors import error_response as anthropic_error_response
from s1serve.serve.openai.errors import error_response


def error_for(path: str, status: int, message: str, kind: str | None = None) -> JSONResponse:
    """Anthropic's error shape on /v1/messages (and below it), OpenAI's elsewhere; `kind`: the OpenAI error type."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return anthropic_error_response(status, message)
    return error_response(status, message, kind=kind)
