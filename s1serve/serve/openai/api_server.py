"""`s1serve serve api_server MODEL`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the AsyncEngine.

With parallel flags (s1serve.distributed): under --tp/--ep this process is rank 0 and hosts the engine (a
`--headless` node runs only its workers); under --dp it is a launcher whose processes are one api_server per DP
rank, on --server-port + DP rank. A distributed engine that dies (a worker process died, a collective failed)
answers 503 at once, and the server exits with status 1 a few seconds later, so that a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from s1serve.distributed.config import ParallelConfig
from s1serve.distributed.launcher import FAILURE_GRACE_S, run_dp_servers, run_headless
from s1serve.engine.async_engine import AsyncEngine, EngineDeadError
from s1serve.engine.config import EngineConfig
from s1serve.engine.engine import Engine
from s1serve.serve.openai.errors import APIError, error_response, install_error_handlers
from s1serve.serve.openai.metrics import ServerMetrics
from s1serve.serve.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from s1serve.serve.openai.serving import ChatServing, CompletionServing, ServingContext
from s1serve.serve.parsers.registry import get_reasoning_parser, get_tool_call_parser
from s1serve.serve.anthropic.errors import error_response as anthropic_error_response
from s1serve.serve.anthropic.routes import add_messages_routes
from s1serve.serve.responses.routes import add_responses_routes
from s1serve.serve.proxy.registration import advertised_url, proxy_membership
from s1serve.tokenizer import load_tokenizer

MAX_BODY_BYTES = 8 << 20
log = logging.getLogger("s1serve.api_server")


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
        response = error_response(413, f"request body is larger than {self.limit} bytes")
        await response(scope, receive, send)


def build_app(ctx: ServingContext, api_keys: tuple[str, ...] = (), lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="s1serve", description="OpenAI-compatible API for Intern-S1-Pro", lifespan=lifespan)
    install_error_handlers(app)
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

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        if body.messages is not None:
            prompt = ctx.tokenizer.apply_chat_template(
                [m.model_dump(exclude_none=True) for m in body.messages],
                add_generation_prompt=body.add_generation_prompt,
                **(body.chat_template_kwargs or {}),
            )
        else:
            prompt = body.prompt
        tokens = ctx.tokenizer.encode(prompt)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": ctx.max_model_len})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        bad = [t for t in body.tokens if not 0 <= t < ctx.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of vocabulary (0..{ctx.vocab_size - 1})", "tokens")
        text = ctx.tokenizer.decode(
            body.tokens,
            skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens,
        )
        return JSONResponse({"prompt": text})

    return app


def run_api_server(args: argparse.Namespace) -> int:
    """Serves until interrupted (see the module's docstring for the parallel shapes); the exit status."""
    parallel = ParallelConfig.from_namespace(args)
    if parallel.headless:
        return run_headless(args, parallel)
    if parallel.dp > 1:
        return run_dp_servers(args, parallel)
    return serve(args, parallel)


def serve(args: argparse.Namespace, parallel: ParallelConfig, rank: int = 0) -> int:
    """One api_server: the engine's rank 0, or DP rank `rank` on --server-port + rank. Loads the model, starts the
    engine thread, serves until interrupted or until a distributed engine dies (then returns 1), stops the engine."""
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = args.server_port + (rank if parallel.dp > 1 else 0)
    reasoning = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None
    tools = get_tool_call_parser(args.tool_call_parser) if args.tool_call_parser else None
    tokenizer = load_tokenizer(args.model)
    engine = AsyncEngine(
        Engine.from_checkpoint(args.model, args.dtype, args.device, EngineConfig.from_namespace(args), tokenizer, parallel, rank)
    )
    name = args.model_name or Path(args.model).resolve().name
    ctx = ServingContext(
        engine=engine,
        tokenizer=tokenizer,
        model_name=name,
        max_model_len=engine.engine.max_model_len,
        vocab_size=engine.engine.runner.model.config.text.vocab_size,
        metrics=ServerMetrics(name),
        reasoning_parser=reasoning,
        tool_parser=tools,
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
            engine.shutdown()
            engine.engine.shutdown()

    app = build_app(ctx, tuple(args.api_keys), lifespan)
    server = uvicorn.Server(
        uvicorn.Config(BodySizeLimit(app, MAX_BODY_BYTES), host=args.server_name, port=port, log_level=args.log_level)
    )

    def exit_soon(error: BaseException) -> None:
        if stopping.is_set():
            return
        died.set()
        log.error("the engine died (%s); exiting in %.0f s", error, FAILURE_GRACE_S)
        timer = threading.Timer(FAILURE_GRACE_S, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()

    if parallel.is_distributed:
        engine.on_death(exit_soon)
    log.info("serving %s as '%s' on http://%s:%d/v1", args.model, name, args.server_name, port)
    server.run()
    return 1 if died.is_set() else 0
