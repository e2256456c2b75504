"""API keys: which requests must carry one, how it is read, and how it is checked (api_server and proxy).

A request presents a key as `Authorization: Bearer <key>` (the OpenAI SDK) or `x-api-key: <key>` (the Anthropic
SDK). Keys are compared as SHA-256 digests with `hmac.compare_digest`, against every accepted key without
stopping at the first match, so neither a key's length nor which key matched shows in the answer's timing.

`RequireKey` is a raw ASGI middleware placed outermost (inside CORS only, so that browser preflights pass): a
request without a valid key is answered before its body is read. Every path needs a key except those its `rule`
leaves open (None), so a route added later is covered without being listed here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, Callable, Iterable, Mapping

from fastapi.responses import JSONResponse

from s1serve.serve.route_errors import error_for_route

KEY_HEADERS = ("authorization", "x-api-key")  # the headers that carry a client's credentials (never forwarded)
# Environment variables read when the flag is not given.
API_KEY_ENV = ("S1SERVE_API_KEY", "VLLM_API_KEY")  # api_server --api-keys
PROXY_API_KEY_ENV = "S1SERVE_PROXY_API_KEY"  # proxy --api-key
ADMIN_KEY_ENV = "S1SERVE_PROXY_ADMIN_KEY"  # proxy --admin-key, api_server --proxy-admin-key
NODE_KEY_ENV = "S1SERVE_PROXY_NODE_KEY"  # proxy --node-key
HINT = "send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class KeyRing:
    """The keys one kind of route accepts. `label` names them in the 401 ("API key", "admin key"); a ring made
    with `refusal` accepts nothing and answers 403 with that reason (a route switched off by configuration)."""

    def __init__(self, keys: Iterable[str], label: str = "API key", refusal: str | None = None) -> None:
        self._digests = tuple(_digest(k) for k in keys)
        self.label = label
        self.refusal = refusal
        if not self._digests and refusal is None:
            raise ValueError(f"a KeyRing needs at least one {label} (or a refusal)")

    def accepts(self, presented: Iterable[bytes]) -> bool:
        ok = False
        for candidate in presented:
            digest = _digest(candidate)
            for accepted in self._digests:
                ok |= hmac.compare_digest(digest, accepted)
        return ok


Rule = Callable[[str], "KeyRing | None"]  # path -> the keys it needs; None: open


def open_paths(metrics_public: bool) -> set[str]:
    """What needs no key on both servers: /health (orchestrators' probes), and /metrics with --metrics-public."""
    return {"/health"} | ({"/metrics"} if metrics_public else set())


def api_server_rule(keys: Iterable[str], metrics_public: bool = False) -> Rule | None:
    """The api_server's rule: with keys, every path but /health (and /metrics with --metrics-public) needs one;
    None (no middleware) without keys."""
    keys = list(keys)
    if not keys:
        return None
    ring = KeyRing(keys)
    public = open_paths(metrics_public)
    return lambda path: None if path in public else ring


NODES_OFF = ("node registration is off: this proxy takes client API keys but was given no admin key, so /nodes/* "
             "would be open to every client; start it with --admin-key (or S1SERVE_PROXY_ADMIN_KEY)")


def proxy_rule(api_keys: Iterable[str], admin_keys: Iterable[str], metrics_public: bool = False) -> Rule | None:
    """The proxy's rule: /nodes/* (add, remove, status) take the admin key, every other path but /health (and
    /metrics with --metrics-public) a client key. With client keys and no admin key, /nodes/* answer 403: a
    client key must never be enough to add a node, which would receive other clients' requests. None without
    any key (everything open, as before keys existed)."""
    api_keys, admin_keys = list(api_keys), list(admin_keys)
    if not api_keys and not admin_keys:
        return None
    clients = KeyRing(api_keys) if api_keys else None
    admin = KeyRing(admin_keys, "admin key") if admin_keys else KeyRing((), "admin key", refusal=NODES_OFF)
    public = open_paths(metrics_public)

    def rule(path: str) -> KeyRing | None:
        if path == "/nodes" or path.startswith("/nodes/"):
            return admin
        return None if path in public else clients

    return rule


def keys_from(flag_keys: Iterable[str | None] | None, env_names: Iterable[str] = API_KEY_ENV,
              environ: Mapping[str, str] = os.environ) -> list[str]:
    """The keys given on the command line; when none, those set in the environment variables `env_names`
    (so that a key need not appear in the process list)."""
    keys = [k for k in (flag_keys or []) if k]
    return keys or [environ[name] for name in env_names if environ.get(name)]


def key_from(flag_key: str | None, env_name: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """One key: the flag's, else the environment variable's, else None."""
    return (keys_from([flag_key], (env_name,), environ) or [None])[0]


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """The keys a request carries: a Bearer token (scheme case-insensitive, RFC 9110) and/or an x-api-key."""
    found = []
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                found.append(token.strip())
        elif name == b"x-api-key" and value.strip():
            found.append(value.strip())
    return found


def refusal_response(path: str, status: int, message: str) -> JSONResponse:
    """401/403 in the shape of the route's API."""
    kind = "authentication_error" if status == 401 else "permission_error"
    return error_for_route(path, status, message, kind=kind)


class RequireKey:
    """ASGI middleware: each HTTP request presents a key its path's KeyRing accepts, or is answered 401/403."""

    def __init__(self, app: Any, rule: Rule) -> None:
        self.app = app
        self.rule = rule

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        ring = self.rule(path)
        if ring is None:
            return await self.app(scope, receive, send)
        if ring.refusal is not None:
            return await refusal_response(path, 403, ring.refusal)(scope, receive, send)
        if not ring.accepts(presented_keys(scope.get("headers", []))):
            message = f"missing or invalid {ring.label} for {path} ({HINT})"
            return await refusal_response(path, 401, message)(scope, receive, send)
        await self.app(scope, receive, send)


def bearer(key: str | None) -> dict[str, str]:
    """The header that presents `key` to another s1serve server (none without a key)."""
    return {"Authorization": f"Bearer {key}"} if key else {}
