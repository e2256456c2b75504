"""Rendering responses in OpenAI's JSON: usage, delta objects and server-sent event streams."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

from s1serve.serve.openai.errors import APIError, error_body
from s1serve.serve.openai.metrics import ServerMetrics
from s1serve.serve.parsers.response import ResponseDelta


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None, cached_tokens: int = 0) -> dict:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


async def sse_stream(
    metrics: ServerMetrics, endpoint: str, base: dict, chunks: AsyncIterator[dict], usage: Callable[[], dict] | None
) -> AsyncIterator[str]:
    """The events of one streamed response: its chunks, an error event if it fails midway, the usage chunk when asked
    for, then [DONE]; the outcome (an abort if the client goes away) is counted in the request metrics."""
    with metrics.counted(endpoint) as outcome:
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield sse(chunk)
        except APIError as exc:
            outcome.failed()
            yield sse(error_body(exc.status, exc.message, exc.param))
    if usage is not None:
        yield sse({**base, "choices": [], "usage": usage()})
    yield "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def delta_json(delta: ResponseDelta) -> dict:
    out: dict[str, Any] = {}
    if delta.reasoning_content:
        out["reasoning_content"] = delta.reasoning_content
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        calls = []
        for call in delta.tool_calls:
            item: dict[str, Any] = {"index": call.index, "function": {"arguments": call.arguments}}
            if call.id is not None:
                item.update(id=call.id, type="function")
                item["function"]["name"] = call.name
            calls.append(item)
        out["tool_calls"] = calls
    return out
