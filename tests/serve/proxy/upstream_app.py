"""A stand-in api_server for the proxy tests (a peer service, not a mock of the proxy).

It speaks the OpenAI shapes the proxy relies on (/v1/models, /v1/chat/completions and /v1/completions,
streamed or not, /health), joins a proxy through s1serve's own registration client, and has switches
(POST /admin/config) to make it slow, hold requests until released, fail its health check, or break streams.
Its counters (GET /admin/state) are the ground truth of which node served what.

    python upstream_app.py --port P --name n0 [--model stub-model ...] [--capacity 1] [--proxy-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from s1serve.serve.proxy.registration import advertised_url, proxy_membership

HOLD_LIMIT_S = 30.0  # a held request gives up after this, so a failed test can never hang on it

DEFAULTS: dict[str, Any] = {
    "delay": 0.0,  # seconds before answering
    "chunk_delay": 0.0,  # seconds between streamed events
    "healthy": True,  # /health answers 200, else 503
    "hold": False,  # requests wait for POST /admin/release
    "break_at": None,  # streams send this many events and half of the next, then drop the connection
}


def create_app(name: str, models: list[str], capacity: int, proxy_url: str | None, port: int,
               rejoin_interval: float = 30.0) -> FastAPI:
    config = dict(DEFAULTS)
    counters = {"received": 0, "completed": 0, "cancelled": 0, "in_flight": 0, "held": 0}
    release = asyncio.Event()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if proxy_url is None:
            yield
            return
        url = advertised_url("127.0.0.1", port, proxy_url)
        async with proxy_membership(proxy_url, url, models, capacity, rejoin_interval=rejoin_interval):
            yield

    app = FastAPI(lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request", "param": None, "code": status}},
                            status_code=status)

    async def wait_turn() -> None:
        if config["hold"]:
            counters["held"] += 1
            try:
                await asyncio.wait_for(release.wait(), HOLD_LIMIT_S)
            except asyncio.TimeoutError:
                pass
            finally:
                counters["held"] -= 1
        if config["delay"]:
            await asyncio.sleep(config["delay"])

    def chunk(kind: str, model: str, text: str | None, finish: str | None) -> dict[str, Any]:
        if kind == "chat":
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        return {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": model, "choices": [choice]}

    async def generate(request: Request, kind: str) -> Response:
        body = await request.json()
        model = body.get("model", models[0])
        if model not in models:
            return error(404, f"The model {model!r} does not exist.")
        max_tokens = body.get("max_tokens", 4)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error(400, "max_tokens must be an integer >= 1")
        counters["received"] += 1
        counters["in_flight"] += 1
        headers = {"x-stub-node": name}
        tokens = [f"tok{i} " for i in range(max_tokens)]
        if not body.get("stream"):
            try:
                await wait_turn()
            finally:
                counters["in_flight"] -= 1
            counters["completed"] += 1
            text = "".join(tokens)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                result = {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": model,
                          "choices": [choice]}
            else:
                result = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": model,
                          "choices": [{"index": 0, "text": text, "finish_reason": "length"}]}
            return JSONResponse(result, headers=headers)

        async def events() -> AsyncIterator[bytes]:
            finished = False
            try:
                await wait_turn()
                for i, token in enumerate(tokens):
                    if config["break_at"] == i:
                        yield b'data: {"half an event'
                        raise ConnectionAbortedError("stub breaks the stream on purpose")
                    if i and config["chunk_delay"]:
                        await asyncio.sleep(config["chunk_delay"])
                    yield b"data: " + json.dumps(chunk(kind, model, token, None)).encode() + b"\n\n"
                yield b"data: " + json.dumps(chunk(kind, model, None, "length")).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                counters["in_flight"] -= 1
                counters["completed" if finished else "cancelled"] += 1

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [{"id": m, "object": "model", "created": 0, "owned_by": name} for m in models]
        return {"object": "list", "data": cards}

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"node": name}, status_code=200 if config["healthy"] else 503)

    @app.get("/admin/state")
    async def state() -> dict[str, Any]:
        return {"name": name, **counters, "config": config}

    @app.post("/admin/config")
    async def configure(changes: dict[str, Any]) -> Any:
        nonlocal release
        unknown = set(changes) - set(DEFAULTS)
        if unknown:
            return error(400, f"unknown settings {sorted(unknown)}")
        config.update(changes)
        if not config["hold"]:
            release.set()
        elif release.is_set():
            release = asyncio.Event()
        return config

    @app.post("/admin/release")
    async def release_held() -> dict[str, Any]:
        config["hold"] = False
        release.set()
        return counters

    @app.post("/admin/reset")
    async def reset() -> dict[str, Any]:
        nonlocal release
        release.set()
        release = asyncio.Event()
        config.clear()
        config.update(DEFAULTS)
        counters.update(received=0, completed=0, cancelled=0)
        return counters

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", action="append", help="served model (repeatable); default stub-model")
    parser.add_argument("--capacity", type=int, default=1)
    parser.add_argument("--proxy-url")
    args = parser.parse_args()
    app = create_app(args.name, args.model or ["stub-model"], args.capacity, args.proxy_url, args.port)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
