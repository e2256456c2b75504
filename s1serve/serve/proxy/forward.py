"""Pass-through of one OpenAI request to one node.

Nothing reaches the client until the upstream has answered (a buffered body, or a stream's first complete
event), so until then a failed node can be swapped for another one, once. After that, an upstream failure
ends the stream with one error event and `data: [DONE]`: the client always learns how its request ended.
"""

from __future__ import annotations

import json
import logging
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from s1serve.serve.auth import KEY_HEADERS
from s1serve.serve.openai.errors import error_body, error_response
from s1serve.serve.proxy.metrics import ProxyMetrics
from s1serve.serve.proxy.nodes import Node, NodeRegistry
from s1serve.serve.proxy.routing import Router

log = logging.getLogger("s1serve.proxy")

# Per-connection headers (RFC 9110 §7.6.1) and those the proxy sets itself are not copied across.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "accept-encoding", "date", "server",
})
# Headers aiohttp would add on its own; the client's (or none) are forwarded instead.
NO_AUTO_HEADERS = ("User-Agent", "Content-Type")
CLIENT_CLOSED = 499  # never seen by the client, recorded for the log


def stream_error_event(message: str) -> bytes:
    error = error_body(502, message, kind="upstream_error")
    return b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"


def requested_model(body: bytes) -> str | None:
    """The body's "model", or None when absent or unreadable (the node then answers the malformed request)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def events_end(buffer: bytes) -> int:
    """Length of the prefix of `buffer` made of complete server-sent events (0 if none)."""
    lf, crlf = buffer.rfind(b"\n\n"), buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def upstream_headers(request: Request) -> list[tuple[str, str]]:
    """The client's headers as sent to a node: without hop-by-hop headers and without the client's credentials
    (the proxy's session presents its own --node-key)."""
    headers = [(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP and k not in KEY_HEADERS]
    client = request.client.host if request.client else ""
    forwarded_for = ", ".join(filter(None, [request.headers.get("x-forwarded-for"), client]))
    headers = [(k, v) for k, v in headers if not k.startswith("x-forwarded-")]
    headers += [("x-forwarded-for", forwarded_for), ("x-forwarded-host", request.headers.get("host", "")),
                ("x-forwarded-proto", request.url.scheme), ("accept-encoding", "identity")]
    return headers


def downstream_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}


class RetryElsewhere(Exception):
    """The attempt failed while the client had received nothing; `fallback` is the node's own answer, if any."""

    def __init__(self, reason: str, fallback: Response | None = None) -> None:
        super().__init__(reason)
        self.fallback = fallback


class Relay:
    """One committed stream: forwards the upstream's bytes unchanged, event by event (so an error event never
    splits one), and however it ends (done, upstream failure, client gone, never started) closes the upstream
    and the node's accounting exactly once."""

    def __init__(self, forwarder: Forwarder, node: Node, started: float, path: str, upstream: aiohttp.ClientResponse,
                 chunks: AsyncIterator[bytes], head: bytes, pending: bytes) -> None:
        self.forwarder, self.node, self.started, self.path = forwarder, node, started, path
        self.upstream, self.chunks, self.head, self.pending = upstream, chunks, head, pending
        self.completed = self.failed = self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        try:
            yield self.head
            try:
                async for chunk in self.chunks:
                    self.pending += chunk
                    cut = events_end(self.pending)
                    if cut:
                        yield self.pending[:cut]
                        self.pending = self.pending[cut:]
            except aiohttp.ClientError as exc:
                self.failed = True
                log.warning("stream from %s broke: %s: %s", self.node.url, type(exc).__name__, exc)
                yield stream_error_event(f"upstream {self.node.url} failed mid-stream ({type(exc).__name__}); "
                                         "the response is incomplete")
                return
            if self.pending:
                yield self.pending
            self.completed = True
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.upstream.close()
        ok = self.upstream.status < 400
        if self.failed:
            outcome = "stream_error"
        elif not self.completed:
            outcome = "client_disconnect"
        else:
            outcome = "ok" if ok else "upstream_error"
        self.forwarder.metrics.requests.labels(self.path, outcome).inc()
        now = self.forwarder.registry.clock()
        self.node.end(now, self.started, completed=self.completed and ok, failed=self.failed)


class RelayResponse(StreamingResponse):
    """A StreamingResponse that closes its relay when it stops, even on disconnect or before the first chunk."""

    def __init__(self, relay: Relay, status_code: int, headers: dict[str, str]) -> None:
        super().__init__(relay.events(), status_code=status_code, headers=headers)
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.relay.close()


async def until_disconnect(request: Request, work: Callable[[], Awaitable[Response]]) -> Response | None:
    """Run `work`, cancelling it if the client goes away first (then None)."""
    result: Response | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        result = await work()
        group.cancel_scope.cancel()
    return result


class Forwarder:
    def __init__(self, registry: NodeRegistry, router: Router, session: aiohttp.ClientSession,
                 metrics: ProxyMetrics) -> None:
        self.registry = registry
        self.router = router
        self.session = session
        self.metrics = metrics

    async def handle(self, request: Request, path: str) -> Response:
        body = await request.body()
        model = requested_model(body)
        if model is not None and self.registry.nodes and not any(n.serves(model) for n in self.registry.nodes.values()):
            self.metrics.requests.labels(path, "proxy_error").inc()
            return error_response(404, f"model {model!r} is not served here; served: {self.registry.models()}",
                                  kind="NotFoundError")
        headers = upstream_headers(request)
        response = await until_disconnect(request, lambda: self._dispatch(path, body, headers, model))
        if response is None:
            self.metrics.requests.labels(path, "client_disconnect").inc()
            return Response(status_code=CLIENT_CLOSED)
        return response

    async def _dispatch(self, path: str, body: bytes, headers: list[tuple[str, str]], model: str | None) -> Response:
        """At most two attempts, on two different nodes; the second only if the first failed before any byte."""
        tried: set[str] = set()
        failures: list[str] = []
        fallback: Response | None = None
        for attempt in range(2):
            candidates = self.registry.candidates(model, exclude=tried)
            if not candidates:
                break
            node = self.router.pick(candidates)
            tried.add(node.url)
            if attempt:
                self.metrics.retries.inc()
            try:
                return await self._attempt(node, path, body, headers)
            except RetryElsewhere as exc:
                failures.append(f"{node.url}: {exc}")
                fallback = exc.fallback or fallback
        if fallback is not None:
            self.metrics.requests.labels(path, "upstream_error").inc()
            return fallback
        self.metrics.requests.labels(path, "proxy_error").inc()
        if not failures:
            served = f"serves model {model!r}" if model else "is registered"
            return error_response(
                503, f"no healthy node {served}; see GET /nodes/status", kind="ServiceUnavailableError"
            )
        return error_response(
            502, "upstream failed before answering: " + "; ".join(failures), kind="BadGatewayError"
        )

    async def _attempt(self, node: Node, path: str, body: bytes, headers: list[tuple[str, str]]) -> Response:
        started = self.registry.clock()
        node.begin(started)
        upstream: aiohttp.ClientResponse | None = None
        handed_off = completed = failed = False
        try:
            try:
                upstream = await self.session.post(node.url + path, data=body, headers=headers,
                                                   skip_auto_headers=NO_AUTO_HEADERS)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # A new connection failed: the node is down, no need to wait for a sweep to say so. (Errors on
                # a reused connection can be a keep-alive race and only cost this attempt.)
                failed = True
                self.registry.mark_unhealthy(node, f"{type(exc).__name__}: {exc}")
                raise RetryElsewhere(f"{type(exc).__name__}: {exc}") from exc
            except aiohttp.ServerTimeoutError:
                failed = True
                return self._timeout(path, node)
            except aiohttp.ClientError as exc:
                failed = True
                raise RetryElsewhere(f"{type(exc).__name__}: {exc}") from exc

            streaming = upstream.headers.get("content-type", "").startswith("text/event-stream")
            try:
                if streaming:
                    chunks = upstream.content.iter_any()
                    head, rest = await self._first_events(chunks)
                else:
                    content = await upstream.read()
            except aiohttp.ServerTimeoutError:
                failed = True
                return self._timeout(path, node)
            except aiohttp.ClientError as exc:
                failed = True
                raise RetryElsewhere(f"broke before the first byte: {type(exc).__name__}: {exc}") from exc

            status = upstream.status
            failed = status >= 500
            if streaming:
                relay = Relay(self, node, started, path, upstream, chunks, head, rest)
                response = RelayResponse(relay, status_code=status, headers=downstream_headers(upstream))
                handed_off = True
                return response
            answer = Response(content, status_code=status, headers=downstream_headers(upstream))
            if status == 503:  # a draining or overloaded node: another may take it
                raise RetryElsewhere("answered 503", fallback=answer)
            completed = 200 <= status < 300
            self.metrics.requests.labels(path, "ok" if completed else "upstream_error").inc()
            return answer
        finally:
            if not handed_off:
                if upstream is not None:
                    upstream.close()  # after a full read the connection is back in the pool; otherwise it is dropped
                node.end(self.registry.clock(), started, completed=completed, failed=failed)

    def _timeout(self, path: str, node: Node) -> Response:
        self.metrics.requests.labels(path, "proxy_error").inc()
        return error_response(
            504, f"upstream {node.url} sent nothing for the request timeout", kind="GatewayTimeoutError"
        )

    @staticmethod
    async def _first_events(chunks: AsyncIterator[bytes]) -> tuple[bytes, bytes]:
        """Read until the first complete event (or the end): the stream is committed to the client only then."""
        buffer = b""
        async for chunk in chunks:
            buffer += chunk
            cut = events_end(buffer)
            if cut:
                return buffer[:cut], buffer[cut:]
        return buffer, b""
