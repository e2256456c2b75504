"""API keys on every route of the api_server and the proxy, the proxy's admin and node keys, and CORS.

Real processes and servers: the session's api_server (keys by --api-keys), one api_server of this module (its key
from S1SERVE_API_KEY, --metrics-public, --allowed-origins, joining the proxy by --proxy-url with the admin key
from S1SERVE_PROXY_ADMIN_KEY), the real proxy app served by uvicorn in this process, and a small upstream of
our own that records the headers it receives. The routes are read from each server's OpenAPI schema at test
time (plus FastAPI's documentation pages and a path no route has), so a route added later is checked too.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Iterator

import httpx
import pytest
from fastapi import FastAPI, Request

from e2e.conftest import API_KEY, RunningServer, start_api_server, stop
from serve.proxy.proxy_procs import InProcessServer, proxy_app, wait_until

NODE_KEY = "sk-node-5b1d"  # the module api_server's key, and the proxy's --node-key
CLIENT_KEY = "sk-proxy-client-9e2a"  # the proxy's --api-key
ADMIN_KEY = "sk-proxy-admin-77c0"  # the proxy's --admin-key
ORIGIN = "https://app.example"
DOC_PAGES = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
UNROUTED = "/no-such-route"


def routes(base_url: str, headers: dict[str, str]) -> list[tuple[str, str]]:
    """(method, path) of every operation in the server's OpenAPI schema, path parameters filled in, plus the
    documentation pages and a path that matches no route."""
    schema = httpx.get(base_url + "/openapi.json", headers=headers, timeout=10)
    assert schema.status_code == 200, schema.text
    found = [(method.upper(), re.sub(r"\{[^}]+\}", "x", path))
             for path, operations in schema.json()["paths"].items() for method in operations]
    assert len(found) >= 3, found
    return found + [("GET", page) for page in DOC_PAGES] + [("GET", UNROUTED), ("POST", UNROUTED)]


def call(base_url: str, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return httpx.request(method, base_url + path, headers=headers, timeout=60, **body)


def assert_refused(response: httpx.Response, path: str, label: str = "API key", status: int = 401) -> None:
    """A 401/403 in the route's error shape that says which key was missing."""
    assert response.status_code == status, (path, response.status_code, response.text)
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == ("authentication_error" if status == 401
                                                                       else "permission_error")
    else:
        assert body["error"]["code"] == status and body["error"]["type"] in ("authentication_error",
                                                                            "permission_error")
    assert label in body["error"]["message"], body


def wrong_credentials(key: str) -> list[dict[str, str]]:
    return [{}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": f"Basic {key}"},
            {"Authorization": f"Bearer {key}x"}]


def right_credentials(key: str) -> list[dict[str, str]]:
    return [{"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"}, {"x-api-key": key}]


def check_matrix(base_url: str, key: str, open_paths: set[str], label: str = "API key") -> None:
    for method, path in routes(base_url, {"Authorization": f"Bearer {key}"}):
        if path in open_paths:
            assert call(base_url, method, path, {}).status_code != 401, path
            continue
        for headers in wrong_credentials(key):
            assert_refused(call(base_url, method, path, headers), path, label)
        for headers in right_credentials(key):
            answer = call(base_url, method, path, headers)
            assert answer.status_code not in (401, 403), (method, path, headers, answer.text)


# ---- fixtures ------------------------------------------------------------------------------------------------


def recorder_app(seen: list[dict[str, str]]) -> FastAPI:
    """An upstream that answers like a node and records the headers of every request it gets."""
    app = FastAPI()

    @app.middleware("http")
    async def record(request: Request, call_next: Any) -> Any:
        seen.append(dict(request.headers))
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "healthy"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "recorder", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> dict:
        message = {"role": "assistant", "content": "recorded"}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "recorder",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    return app


@pytest.fixture(scope="module")
def seen() -> list[dict[str, str]]:
    return []


@pytest.fixture(scope="module")
def recorder(seen: list[dict[str, str]]) -> Iterator[InProcessServer]:
    server = InProcessServer(recorder_app(seen), "recorder")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy() -> Iterator[InProcessServer]:
    app, port = proxy_app("round_robin", api_keys=(CLIENT_KEY,), admin_keys=(ADMIN_KEY,), node_key=NODE_KEY)
    server = InProcessServer(app, "proxy", port)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(tiny_checkpoint, proxy: InProcessServer, tmp_path_factory) -> Iterator[RunningServer]:
    """An api_server whose keys come from the environment, joined to the proxy."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("S1SERVE_API_KEY", NODE_KEY)
        env.setenv("S1SERVE_PROXY_ADMIN_KEY", ADMIN_KEY)
        server = start_api_server(
            tiny_checkpoint, tmp_path_factory.mktemp("auth") / "server.log",
            "--model-name", "tiny-auth", "--max-model-len", "512", "--num-kv-blocks", "64", "--block-size", "16",
            "--metrics-public", "--allowed-origins", ORIGIN, "--proxy-url", proxy.url,
        )
    server.api_key = NODE_KEY
    yield server
    stop(server)


def admin(proxy: InProcessServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, proxy.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10,
                         **kwargs)


# ---- api_server ----------------------------------------------------------------------------------------------


def test_every_api_server_route_needs_the_key_given_by_flag(api_server: RunningServer):
    """--api-keys: every route but /health, /metrics included (no --metrics-public)."""
    check_matrix(api_server.base_url, API_KEY, open_paths={"/health"})
    assert httpx.get(api_server.base_url + "/health").status_code == 200
    assert_refused(httpx.get(api_server.base_url + "/metrics"), "/metrics")
    metrics = httpx.get(api_server.base_url + "/metrics", headers={"x-api-key": API_KEY})
    assert metrics.status_code == 200 and "s1serve" in metrics.text


def test_every_api_server_route_needs_the_key_from_the_environment(node: RunningServer):
    """S1SERVE_API_KEY instead of a flag; /metrics open with --metrics-public; the keys never reach the log."""
    check_matrix(node.base_url, NODE_KEY, open_paths={"/health", "/metrics"})
    metrics = httpx.get(node.base_url + "/metrics")
    assert metrics.status_code == 200 and "s1serve" in metrics.text
    log = node.log_path.read_text(errors="replace")
    assert NODE_KEY not in log and ADMIN_KEY not in log


def test_anthropic_sdk_key_header_and_error_shape(node: RunningServer):
    from anthropic import Anthropic, AuthenticationError

    with pytest.raises(AuthenticationError) as refused:
        Anthropic(base_url=node.base_url, api_key="wrong", max_retries=0).messages.count_tokens(
            model="tiny-auth", messages=[{"role": "user", "content": "hi"}])
    assert "API key" in str(refused.value)
    counted = Anthropic(base_url=node.base_url, api_key=NODE_KEY, max_retries=0).messages.count_tokens(
        model="tiny-auth", messages=[{"role": "user", "content": "hi"}])
    assert counted.input_tokens > 0


def test_cors_is_off_by_default_and_on_for_allowed_origins(api_server: RunningServer, node: RunningServer):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    # No --allowed-origins: no CORS header on an answer, and a preflight (which carries no key) is refused.
    plain = httpx.get(api_server.base_url + "/v1/models", headers={"Origin": ORIGIN, **api_server.headers})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    assert_refused(httpx.options(api_server.base_url + "/v1/chat/completions", headers=preflight),
                   "/v1/chat/completions")
    # --allowed-origins: the preflight passes without a key, answers carry the origin, other origins are refused.
    allowed = httpx.options(node.base_url + "/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    answer = httpx.get(node.base_url + "/v1/models", headers={"Origin": ORIGIN, "x-api-key": NODE_KEY})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.get(node.base_url + "/v1/models", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(node.base_url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


# ---- proxy ---------------------------------------------------------------------------------------------------


def test_every_proxy_route_needs_its_key(proxy: InProcessServer, node: RunningServer):
    """Client routes take the client key (not the admin key), /nodes/* the admin key (not the client key)."""
    wait_until(lambda: admin(proxy, "GET", "/nodes/status").json().get(node.base_url, {}).get("healthy"),
               "the api_server to join the proxy with the admin key", timeout=30)
    operations = routes(proxy.url, {"Authorization": f"Bearer {CLIENT_KEY}"})
    assert {("POST", "/nodes/add"), ("POST", "/nodes/remove"), ("GET", "/nodes/status")} <= set(operations)
    for method, path in operations:
        is_admin = path.startswith("/nodes/")
        key, other = (ADMIN_KEY, CLIENT_KEY) if is_admin else (CLIENT_KEY, ADMIN_KEY)
        if path == "/health":
            assert call(proxy.url, method, path, {}).status_code == 200
            continue
        for headers in wrong_credentials(key) + [{"Authorization": f"Bearer {other}"}]:
            assert_refused(call(proxy.url, method, path, headers), path, "admin key" if is_admin else "API key")
        for headers in right_credentials(key):
            answer = call(proxy.url, method, path, headers)
            assert answer.status_code not in (401, 403), (method, path, headers, answer.text)


def test_only_the_admin_key_adds_or_removes_nodes(proxy: InProcessServer, recorder: InProcessServer):
    before = admin(proxy, "GET", "/nodes/status").json()
    add = {"url": recorder.url, "status": {"models": ["recorder"]}}
    for headers in ({}, {"Authorization": f"Bearer {CLIENT_KEY}"}, {"x-api-key": CLIENT_KEY}):
        refused = httpx.post(proxy.url + "/nodes/add", json=add, headers=headers, timeout=10)
        assert_refused(refused, "/nodes/add", "admin key")
    assert admin(proxy, "GET", "/nodes/status").json() == before
    added = admin(proxy, "POST", "/nodes/add", json=add)
    assert added.status_code == 200 and added.json()["url"] == recorder.url
    assert recorder.url in admin(proxy, "GET", "/nodes/status").json()
    for headers in ({}, {"Authorization": f"Bearer {CLIENT_KEY}"}):
        refused = httpx.post(proxy.url + "/nodes/remove", params={"node_url": recorder.url}, headers=headers)
        assert_refused(refused, "/nodes/remove", "admin key")
    assert recorder.url in admin(proxy, "GET", "/nodes/status").json()


def test_nodes_see_the_node_key_and_never_the_clients_key(proxy: InProcessServer, recorder: InProcessServer,
                                                          node: RunningServer, seen: list[dict[str, str]]):
    admin(proxy, "POST", "/nodes/add", json={"url": recorder.url, "status": {"models": ["recorder"]}})
    wait_until(lambda: admin(proxy, "GET", "/nodes/status").json()[recorder.url]["healthy"], "the recorder")
    client = {"Authorization": f"Bearer {CLIENT_KEY}", "x-api-key": CLIENT_KEY}
    message = [{"role": "user", "content": "hi"}]
    seen.clear()
    answer = httpx.post(proxy.url + "/v1/chat/completions", headers=client, timeout=60,
                        json={"model": "recorder", "messages": message})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "recorded"
    (forwarded,) = [h for h in seen if "x-forwarded-for" in h]
    assert forwarded["authorization"] == f"Bearer {NODE_KEY}" and "x-api-key" not in forwarded
    assert all(CLIENT_KEY not in value for headers in seen for value in headers.values())
    # The real api_server, which takes only NODE_KEY, answers through the proxy (it would refuse the client's key).
    real = httpx.post(proxy.url + "/v1/chat/completions", headers=client, timeout=60,
                      json={"model": "tiny-auth", "messages": message, "max_tokens": 2})
    assert real.status_code == 200, real.text
    assert real.json()["model"] == "tiny-auth"
    assert_refused(httpx.post(node.base_url + "/v1/chat/completions", headers=client, timeout=10,
                              json={"model": "tiny-auth", "messages": message, "max_tokens": 2}),
                   "/v1/chat/completions")
    admin(proxy, "POST", "/nodes/remove", params={"node_url": recorder.url})


def test_a_proxy_with_client_keys_but_no_admin_key_refuses_node_changes():
    app, port = proxy_app("round_robin", api_keys=(CLIENT_KEY,))
    server = InProcessServer(app, "proxy-no-admin", port)
    try:
        for headers in ({}, {"Authorization": f"Bearer {CLIENT_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
            add = httpx.post(server.url + "/nodes/add", json={"url": "http://127.0.0.1:9"}, headers=headers)
            assert_refused(add, "/nodes/add", "--admin-key", status=403)
            assert_refused(httpx.get(server.url + "/nodes/status", headers=headers), "/nodes/status", "--admin-key",
                           status=403)
        assert httpx.get(server.url + "/health").status_code == 503  # open, and no node could join
    finally:
        server.stop()


def test_proxy_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    from s1serve.serve.proxy.config import add_proxy_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_proxy_arguments(parser)
    monkeypatch.setenv("S1SERVE_PROXY_API_KEY", "c")
    monkeypatch.setenv("S1SERVE_PROXY_ADMIN_KEY", "a")
    monkeypatch.setenv("S1SERVE_PROXY_NODE_KEY", "n")
    config = config_from_args(parser.parse_args([]))
    assert (config.api_keys, config.admin_keys, config.node_key) == (("c",), ("a",), "n")
    assert "api_keys" not in repr(config) and "node_key" not in repr(config)  # keys stay out of logs
    flags = config_from_args(parser.parse_args(["--api-key", "c2", "--admin-key", "a2", "--node-key", "n2"]))
    assert (flags.api_keys, flags.admin_keys, flags.node_key) == (("c2",), ("a2",), "n2")
