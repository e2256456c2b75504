"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine it is handed (an EngineClient).

Which processes run it, with which engine, is s1serve.entrypoints' business (entrypoints/api_server.py). An
engine that dies answers 503 at once; when asked to, the server then exits with status 1 a few seconds later, so
that a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from s1serve.engine.client import EngineClient, EngineDeadError
from s1serve.sampling_params import InvalidParameterError, check_token_ids
from s1serve.serve.anthropic.errors import error_response as anthropic_error_response
from s1serve.serve.anthropic.routes import add_messages_routes
from s1serve.serve.body_limit import BodySizeLimit
from s1serve.serve.json_body import CheckJSONBody
from s1serve.serve.openai.errors import APIError, error_response
from s1serve.serve.openai.metrics import ServerMetrics
from s1serve.serve.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from s1serve.serve.openai.arguments import media_pipeline
from s1serve.serve.openai.prepare import ServingContext, render_chat_prompt
from s1serve.serve.openai.serving import ChatServing, CompletionServing
from s1serve.serve.parsers.registry import get_reasoning_parser, get_tool_call_parser
from s1serve.serve.proxy.registration import advertised_url, proxy_membership
from s1serve.serve.responses.routes import add_responses_routes
from s1serve.serve.route_errors import install_error_handling
from s1serve.tokenizer import Tokenizer

log = logging.getLogger("s1serve.api_server")


def build_app(ctx: ServingContext, api_keys: tuple[str, ...] = (), lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="s1serve", description="OpenAI-compatible API for Intern-S1-Pro", lifespan=lifespan)
    install_error_handling(app)
    chat, completions = ChatServing(ctx), CompletionServing(ctx)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        if api_keys and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            key = header[len("Bearer ") :] if header.startswith("Bearer ") else request.headers.get("x-api-key")
            if key not in api_keys:
                message = "missing or invalid API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')"
                if request.url.path.startswith("/v1/messages"):
                    return anthropic_error_response(401, message)
                return error_response(401, message)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        try:
            await ctx.engine.stats()
        except EngineDeadError as exc:
            return error_response(503, str(exc))
        return JSONResponse({"status": "healthy"})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            ctx.metrics.observe_engine(await ctx.engine.stats())
        except EngineDeadError:
            pass  # the last values stay; /health reports the failure
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=ctx.model_name, max_model_len=ctx.max_model_len)])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await chat.create(body)

    add_responses_routes(app, chat)
    add_messages_routes(app, chat)

    @app.post("/v1/completions")
    async def text_completions(body: CompletionRequest) -> Response:
        return await completions.create(body)

    def tokens_of(body: TokenizeRequest) -> list[int]:
        if body.messages is None:
            return ctx.tokenizer.encode(body.prompt)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt = render_chat_prompt(ctx.tokenizer, messages, None, body.add_generation_prompt, body.chat_template_kwargs)
        return ctx.tokenizer.encode(prompt)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        tokens = await asyncio.to_thread(tokens_of, body)  # rendering and tokenising off the event loop
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": ctx.max_model_len})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        try:
            check_token_ids(body.tokens, ctx.vocab_size, "tokens", "token id")
        except InvalidParameterError as exc:
            raise APIError(400, str(exc), exc.param) from None
        text = await asyncio.to_thread(
            ctx.tokenizer.decode,
            body.tokens,
            skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens,
        )
        return JSONResponse({"prompt": text})

    return app


def post_paths(app: FastAPI) -> frozenset[str]:
    """The routes that take a JSON body (all POST routes of the api_server)."""
    return frozenset(r.path for r in app.routes if "POST" in (getattr(r, "methods", None) or ()))


def serve_http(engine: EngineClient, tokenizer: Tokenizer, args: argparse.Namespace, port: int,
               exit_grace_s: float | None = None, sock: socket.socket | None = None) -> int:
    """Serves `engine` on `port` with the api_server flags in `args` until interrupted; stops the engine after.
    With `exit_grace_s`, an engine that dies (its process ended, a worker process died, a collective failed) makes
    the server answer 503 at once and exit with status 1 that many seconds later; the return value is the exit
    status. `sock`: a listening socket bound to `port` already (shared by several API server processes)."""
    import uvicorn

    reasoning = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None
    tools = get_tool_call_parser(args.tool_call_parser) if args.tool_call_parser else None
    name = args.model_name or Path(args.model).resolve().name
    ctx = ServingContext(
        engine=engine,
        tokenizer=tokenizer,
        model_name=name,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        metrics=ServerMetrics(name),
        reasoning_parser=reasoning,
        tool_parser=tools,
        media=media_pipeline(Path(args.model), tokenizer, args),
        request_timeout=args.request_timeout,
    )
    stopping = threading.Event()
    died = threading.Event()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        try:
            if args.proxy_url:
                node_url = advertised_url(args.server_name, port, args.proxy_url)
                async with proxy_membership(args.proxy_url, node_url, models=[name], capacity=args.max_num_seqs):
                    yield
            else:
                yield
        finally:
            stopping.set()
            engine.close()

    app = build_app(ctx, tuple(args.api_keys), lifespan)
    server = uvicorn.Server(
        uvicorn.Config(BodySizeLimit(CheckJSONBody(app, post_paths(app)), args.max_request_body_bytes), host=args.server_name, port=port, log_level=args.log_level)
    )

    def exit_soon(error: BaseException) -> None:
        if stopping.is_set() or exit_grace_s is None:
            return
        died.set()
        log.error("the engine died (%s); exiting in %.0f s", error, exit_grace_s)
        timer = threading.Timer(exit_grace_s, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()

    if exit_grace_s is not None:
        engine.on_death(exit_soon)
    log.info("serving %s as '%s' on http://%s:%d/v1", args.model, name, args.server_name, port)
    server.run(sockets=None if sock is None else [sock])
    return 1 if died.is_set() else 0
