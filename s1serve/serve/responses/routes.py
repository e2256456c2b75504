"""`POST /v1/responses` and `GET /v1/responses/{id}`: translate, run through the chat path, render, store."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from s1serve.serve.block_run import BlockRun, prepare
from s1serve.serve.blocks import Block
from s1serve.serve.openai.errors import APIError
from s1serve.serve.openai.protocol import random_id
from s1serve.serve.openai.serving import ChatServing
from s1serve.serve.responses.protocol import ResponsesRequest
from s1serve.serve.responses.render import ResponseRenderer
from s1serve.serve.responses.store import ResponseStore, StoredResponse
from s1serve.serve.responses.translate import ChatTranslation, to_chat


def assistant_message(blocks: list[Block]) -> dict:
    """A finished response's output as the chat message that continues the conversation."""
    message: dict = {"role": "assistant", "content": "".join(b.text for b in blocks if b.kind == "text") or None}
    reasoning = "".join(b.text for b in blocks if b.kind == "reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [{"id": b.call_id, "type": "function", "function": {"name": b.name, "arguments": b.text}}
             for b in blocks if b.kind == "tool_call"]
    if calls:
        message["tool_calls"] = calls
    return message


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class ResponsesServing:
    def __init__(self, chat: ChatServing, store: ResponseStore):
        self.chat = chat
        self.store = store

    def _keep(self, req: ResponsesRequest, translation: ChatTranslation, run: BlockRun, response: dict) -> None:
        if not req.store:
            return
        blocks = run.builder.final_blocks()
        calls = translation.call_ids | {b.call_id for b in blocks if b.kind == "tool_call" and b.call_id}
        self.store.put(response["id"], StoredResponse(response, translation.messages + [assistant_message(blocks)], calls))

    async def create(self, req: ResponsesRequest) -> JSONResponse | StreamingResponse:
        translation = to_chat(req, self.store)
        run = await prepare(self.chat, translation.chat)
        renderer = ResponseRenderer(req, random_id("resp_"), self.chat.ctx.model_name)
        metrics = self.chat.ctx.metrics
        if req.stream:
            with metrics.counted_if_failed("responses"):
                await run.start()
            return StreamingResponse(self._stream(req, translation, run, renderer), media_type="text/event-stream")
        with metrics.counted("responses"):
            await run.run()
        response = renderer.final(run.builder.blocks, run.finish_reason, run.usage())
        self._keep(req, translation, run, response)
        return JSONResponse(response)

    async def _stream(
        self, req: ResponsesRequest, translation: ChatTranslation, run: BlockRun, renderer: ResponseRenderer
    ) -> AsyncIterator[str]:
        with self.chat.ctx.metrics.counted("responses") as outcome:
            try:
                for event in renderer.start():
                    yield _sse(event)
                async for block_event in run.events():
                    for event in renderer.events(block_event, run.builder.blocks):
                        yield _sse(event)
                response = renderer.final(run.builder.blocks, run.finish_reason, run.usage())
                self._keep(req, translation, run, response)
                yield _sse(renderer.end(response))
            except APIError as exc:
                outcome.failed()
                yield _sse(renderer.error(exc.status, exc.message, exc.param))

    def retrieve(self, response_id: str) -> JSONResponse:
        entry = self.store.get(response_id)
        if entry is None:
            raise APIError(404, f"response {response_id!r} is unknown or was evicted (store keeps {self.store.capacity})",
                           "response_id")
        return JSONResponse(entry.response)


def add_responses_routes(app: FastAPI, chat: ChatServing, store: ResponseStore | None = None) -> None:
    serving = ResponsesServing(chat, store or ResponseStore())

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest):
        return await serving.create(body)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str):
        return serving.retrieve(response_id)
