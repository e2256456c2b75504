"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine it is handed (an EngineClient).

Which processes run it, with which engine, is s1serve.entrypoints' business (entrypoints/api_server.py). An
engine that dies answers 503 at once; when asked to, the server then exits with status 1 a few seconds later, so
that a supervisor restarts it. /health never waits for the engine: it reads whether the engine has died and how
long its current step has run (503 past --engine-step-timeout). A client that disconnects aborts its request
(serve/disconnect.py); SIGTERM drains (serve/drain.py).
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

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from s1serve.engine.client import EngineClient, EngineDeadError
from s1serve.engine.faults import FaultPlan
from s1serve.sampling_params import InvalidParameterError, check_token_ids
from s1serve.serve.anthropic.routes import add_messages_routes
from s1serve.serve.auth import ADMIN_KEY_ENV, RequireKey, api_server_rule, key_from, keys_from
from s1serve.serve.body_limit import BodySizeLimit
from s1serve.serve.cors import CorsSettings, with_cors
from s1serve.serve.disconnect import CancelOnDisconnect
from s1serve.serve.drain import DrainGate, DrainingServer
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
from s1serve.serve.openai.arguments import DEFAULT_ENGINE_STEP_TIMEOUT_S, media_pipeline
from s1serve.serve.openai.prepare import ServingContext, render_chat_prompt
from s1serve.serve.openai.serving import ChatServing, CompletionServing
from s1serve.serve.parsers.registry import get_reasoning_parser, get_tool_call_parser
from s1serve.serve.proxy.registration import Membership, advertised_url, proxy_membership
from s1serve.serve.responses.routes import add_responses_routes
from s1serve.serve.route_errors import error_for_route, install_error_handling
from s1serve.tokenizer import Tokenizer

DRAINING = "the server is shutting down: it takes no new requests while those in flight finish"
log = logging.getLogger("s1serve.api_server")


def build_app(ctx: ServingContext, lifespan: Any = None,
              engine_step_timeout: float = DEFAULT_ENGINE_STEP_TIMEOUT_S) -> FastAPI:
    """The routes; API keys, CORS, body limit and drain wrap it in serve_http."""
    app = FastAPI(title="s1serve", description="OpenAI-compatible API for Intern-S1-Pro", lifespan=lifespan)
    install_error_handling(app)
    chat, completions = ChatServing(ctx), CompletionServing(ctx)

    @app.get("/health")
    async def health() -> Response:
        if ctx.engine.errored:
            return error_response(503, f"the engine has stopped: {ctx.engine.error}")
        step = ctx.engine.running_step()
        if step is not None and step.age_s > engine_step_timeout:
            return error_response(503, f"{step.describe()}, longer than --engine-step-timeout {engine_step_timeout:g} s")
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
        faults=FaultPlan.from_env(),
    )
    stopping = threading.Event()
    died = threading.Event()
    memberships: list[Membership] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        try:
            if args.proxy_url:
                node_url = advertised_url(args.server_name, port, args.proxy_url)
                admin_key = key_from(args.proxy_admin_key, ADMIN_KEY_ENV)
                async with proxy_membership(args.proxy_url, node_url, models=[name], capacity=args.max_num_seqs,
                                            admin_key=admin_key) as m:
                    memberships.append(m)
                    yield
            else:
                yield
        finally:
            stopping.set()
            engine.close()

    async def leave_proxy() -> None:
        for membership in memberships:
            await membership.leave()

    routes = build_app(ctx, lifespan, args.engine_step_timeout)
    app: Any = CancelOnDisconnect(BodySizeLimit(CheckJSONBody(routes, post_paths(routes)), args.max_request_body_bytes))
    rule = api_server_rule(keys_from(args.api_keys), args.metrics_public)
    if rule is not None:
        app = RequireKey(app, rule)  # before the body is read
    gate = DrainGate(with_cors(app, CorsSettings.from_args(args)), lambda path: error_for_route(path, 503, DRAINING))
    config = uvicorn.Config(gate, host=args.server_name, port=port, log_level=args.log_level)
    # Past the grace period the requests still running get their error: the engine client is closed.
    server = DrainingServer(config, gate, args.shutdown_timeout, on_drain=leave_proxy, on_timeout=engine.close)

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
