"""The proxy's HTTP face: node registration, the OpenAI pass-through routes, its own health and metrics."""

from __future__ import annotations

import asyncio
import random
from contextlib import asynccontextmanager, suppress
from typing import Any, AsyncIterator

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.middleware.cors import CORSMiddleware

from s1serve.serve.body_limit import BodySizeLimit
from s1serve.serve.auth import RequireKey, bearer, proxy_rule
from s1serve.serve.openai.errors import error_response
from s1serve.serve.proxy.config import ProxyConfig
from s1serve.serve.proxy.forward import Forwarder
from s1serve.serve.proxy.metrics import CONTENT_TYPE, ProxyMetrics
from s1serve.serve.proxy.nodes import HealthMonitor, Node, NodeRegistry, normalize_url
from s1serve.serve.proxy.routing import Router


class NodeStatusIn(BaseModel):
    models: list[str] = Field(default_factory=list, description="models the node serves; empty: ask its /v1/models")
    capacity: int = Field(1, ge=1, description="concurrent sequences it can run (weights `random`, seeds throughput)")
    role: str = "Hybrid"


class NodeAdd(BaseModel):
    url: str
    status: NodeStatusIn = Field(default_factory=NodeStatusIn)


def create_app(config: ProxyConfig) -> FastAPI:
    registry = NodeRegistry()
    metrics = ProxyMetrics(registry)
    router = Router(config.routing_strategy, random.Random(config.seed))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One pooled session for all nodes (it needs a running loop, hence here). No connection limit: each client
        # request holds one upstream connection while it streams. Idle connections are dropped before uvicorn's
        # 5 s keep-alive timeout, so a node never closes one just as the proxy reuses it. Bytes are relayed as
        # the node wrote them (no decompression).
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0),
            timeout=aiohttp.ClientTimeout(total=None, connect=config.connect_timeout, sock_read=config.request_timeout),
            auto_decompress=False,
            headers=bearer(config.node_key),  # every call to a node, health checks included (never the client's key)
        )
        app.state.monitor = HealthMonitor(registry, session, config.health_interval, config.health_timeout,
                                          config.unhealthy_after)
        app.state.forwarder = Forwarder(registry, router, session, metrics)
        sweeps = asyncio.create_task(app.state.monitor.run())
        try:
            yield
        finally:
            sweeps.cancel()
            with suppress(asyncio.CancelledError):
                await sweeps
            await session.close()

    app = FastAPI(title="s1serve proxy", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, limit=config.max_request_body_bytes)
    app.state.registry = registry
    rule = proxy_rule(config.api_keys, config.admin_keys, config.metrics_public)
    if rule is not None:
        app.add_middleware(RequireKey, rule=rule)  # outermost but for CORS: before the body is read
    if config.cors.allowed_origins:
        app.add_middleware(CORSMiddleware, **config.cors.options())  # outside the key check: preflights carry none

    @app.post("/nodes/add")
    async def add_node(body: NodeAdd, request: Request) -> Response:
        if body.status.role != "Hybrid":
            return error_response(400, f"node role {body.status.role!r} (prefill/decode disaggregation) is not "
                                       "supported yet; only Hybrid nodes can join", kind="BadRequestError")
        try:
            url = normalize_url(body.url)
        except ValueError as exc:
            return error_response(400, str(exc), kind="BadRequestError")
        node = registry.add(url, body.status.models, body.status.capacity)
        await request.app.state.monitor.probe(node)  # a node that does not answer yet joins unhealthy; sweeps admit it
        return JSONResponse(node.status())

    @app.post("/nodes/remove")
    async def remove_node(node_url: str) -> Response:
        url = node_url.strip().rstrip("/")
        if not registry.remove(url):
            return error_response(404, f"node {url!r} is not registered", kind="NotFoundError")
        return JSONResponse({"removed": url})

    @app.get("/nodes/status")
    async def nodes_status() -> dict[str, Any]:
        return {url: node.status() for url, node in registry.nodes.items()}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        """The union of the healthy nodes' own model cards (first card of each id wins)."""
        monitor: HealthMonitor = request.app.state.monitor

        async def cards_of(node: Node) -> list[dict[str, Any]]:
            try:
                return await monitor.model_cards(node)
            except Exception:  # a node that does not answer is represented by its registered names
                return [{"id": m, "object": "model", "created": 0, "owned_by": "s1serve"} for m in node.models]

        cards: dict[str, dict[str, Any]] = {}
        for node_cards in await asyncio.gather(*(cards_of(n) for n in registry.nodes.values() if n.healthy)):
            for card in node_cards:
                cards.setdefault(card["id"], card)
        return {"object": "list", "data": list(cards.values())}

    @app.get("/health")
    async def health() -> Response:
        healthy = sum(n.healthy for n in registry.nodes.values())
        return JSONResponse({"status": "healthy" if healthy else "no healthy node", "healthy_nodes": healthy,
                             "nodes": len(registry.nodes)}, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await request.app.state.forwarder.handle(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await request.app.state.forwarder.handle(request, "/v1/completions")

    return app
