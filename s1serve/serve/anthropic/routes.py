"""`POST /v1/messages` and `/v1/messages/count_tokens`: translate, run through the chat path, render.

Bodies are read here rather than by FastAPI so that every failure, validation included, answers in Anthropic's
error shape (the server's other routes answer in OpenAI's).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from s1serve.serve.anthropic.errors import error_body, error_response, validation_message
from s1serve.serve.anthropic.protocol import CountTokensRequest, MessagesRequest
from s1serve.serve.anthropic.render import MessageRenderer
from s1serve.serve.anthropic.translate import count_request, to_chat
from s1serve.serve.block_run import BlockRun, prepare
from s1serve.serve.openai.errors import APIError
from s1serve.serve.openai.protocol import random_id
from s1serve.serve.openai.prepare import check_model
from s1serve.serve.openai.serving import ChatServing


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


async def _body(request: Request, model: type[BaseModel]) -> BaseModel:
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise APIError(400, validation_message(exc)) from None


def _openapi_body(model: type[BaseModel]) -> dict:
    """The OpenAPI requestBody of a route that reads its body itself: `model`'s JSON Schema, its $defs inlined
    (the models hold no recursive types), so that the schema documents the route and fuzzers can reach it."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


class MessagesServing:
    def __init__(self, chat: ChatServing):
        self.chat = chat

    async def create(self, req: MessagesRequest) -> Response:
        translation = to_chat(req)
        run = await prepare(self.chat, translation.chat, translation.reasoning_budget)
        renderer = MessageRenderer(random_id("msg_"), self.chat.ctx.model_name)
        if req.stream:
            with self.chat.ctx.metrics.counted_if_failed("messages"):
                await run.start()
            return StreamingResponse(self._stream(run, renderer), media_type="text/event-stream")
        with self.chat.ctx.metrics.counted("messages"):
            await run.run()
        return JSONResponse(renderer.final(run.builder.blocks, run.finish_reason, run.stop_string, run.usage()))

    async def _stream(self, run: BlockRun, renderer: MessageRenderer) -> AsyncIterator[str]:
        with self.chat.ctx.metrics.counted("messages") as outcome:
            try:
                for event in renderer.start(len(run.prepared.gen.prompt_ids)):
                    yield _sse(event)
                async for block_event in run.events():
                    for event in renderer.events(block_event, run.builder.blocks):
                        yield _sse(event)
                message = renderer.final(run.builder.blocks, run.finish_reason, run.stop_string, run.usage())
                for event in renderer.end(message):
                    yield _sse(event)
            except APIError as exc:
                outcome.failed()
                yield _sse(error_body(exc.status, exc.message))

    async def count_tokens(self, req: CountTokensRequest) -> JSONResponse:
        chat = count_request(req)
        check_model(self.chat.ctx, chat.model)
        _, prompt_ids, _ = await self.chat.prompt(chat)
        return JSONResponse({"input_tokens": len(prompt_ids)})


def add_messages_routes(app: FastAPI, chat: ChatServing) -> None:
    serving = MessagesServing(chat)

    @app.post("/v1/messages", openapi_extra=_openapi_body(MessagesRequest))
    async def create_message(request: Request) -> Response:
        try:
            return await serving.create(await _body(request, MessagesRequest))
        except APIError as exc:
            return error_response(exc.status, exc.message, exc.headers)

    @app.post("/v1/messages/count_tokens", openapi_extra=_openapi_body(CountTokensRequest))
    async def count_tokens(request: Request) -> Response:
        try:
            return await serving.count_tokens(await _body(request, CountTokensRequest))
        except APIError as exc:
            return error_response(exc.status, exc.message, exc.headers)
