"""How an api_server joins and leaves a proxy (`--proxy-url`).

Use `proxy_membership` around the server's lifetime (in its lifespan): it registers in the background once the
server answers its own /health with 200, so startup never waits for the proxy, re-registers now and then so that
a restarted proxy finds it again, and unregisters on shutdown, or earlier when the server starts draining
(`Membership.leave`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from contextlib import asynccontextmanager, suppress
from typing import AsyncIterator
from urllib.parse import urlsplit

import httpx

from s1serve.serve.auth import bearer

log = logging.getLogger("s1serve.proxy.registration")


class RegistrationRefused(Exception):
    """The proxy answered and said no (4xx): retrying the same request cannot help."""


def advertised_url(server_name: str, port: int, proxy_url: str, scheme: str = "http") -> str:
    """The url the proxy should use to reach this server.

    A wildcard bind address (0.0.0.0, ::) is not reachable, so it is replaced by this machine's address on the
    route to the proxy (a UDP connect sends no packet; it only asks the kernel which interface it would use).
    """
    host = server_name
    if host in ("", "0.0.0.0", "::"):
        target = urlsplit(proxy_url)
        family = socket.AF_INET6 if host == "::" else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((target.hostname or "127.0.0.1", target.port or 80))
                host = probe.getsockname()[0]
            except OSError:
                host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


async def register_with_proxy(proxy_url: str, node_url: str, models: list[str], capacity: int = 1, *,
                              admin_key: str | None = None, retry_interval: float = 0.25,
                              max_retry_interval: float = 2.0) -> None:
    """POST /nodes/add (with the proxy's admin key, if any) until the proxy answers 2xx; connection errors and 5xx
    are retried with growing pauses."""
    body = {"url": node_url, "status": {"models": models, "capacity": capacity, "role": "Hybrid"}}
    pause = retry_interval
    async with httpx.AsyncClient(timeout=10.0, headers=bearer(admin_key)) as client:
        while True:
            try:
                response = await client.post(f"{proxy_url.rstrip('/')}/nodes/add", json=body)
                if response.is_success:
                    log.debug("registered %s with proxy %s", node_url, proxy_url)
                    return
                if response.is_client_error:
                    refusal = f"{response.status_code} {response.text}"
                    raise RegistrationRefused(f"proxy {proxy_url} refused {node_url}: {refusal}")
                reason = f"answered {response.status_code}"
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            log.info("proxy %s not ready (%s); retrying in %.1fs", proxy_url, reason, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, max_retry_interval)


async def unregister_from_proxy(proxy_url: str, node_url: str, timeout: float = 5.0,
                                admin_key: str | None = None) -> bool:
    """POST /nodes/remove once; False (logged, not raised) if the proxy is gone: shutdown must not fail on it."""
    try:
        async with httpx.AsyncClient(timeout=timeout, headers=bearer(admin_key)) as client:
            response = await client.post(f"{proxy_url.rstrip('/')}/nodes/remove", params={"node_url": node_url})
        return response.is_success
    except httpx.HTTPError as exc:
        log.warning("could not unregister %s from proxy %s: %s", node_url, proxy_url, exc)
        return False


async def wait_until_serving(node_url: str, interval: float = 0.2) -> None:
    """Poll our own /health until it answers 200 (the lifespan runs before the server accepts connections)."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            with suppress(httpx.HTTPError):
                if (await client.get(f"{node_url}/health")).status_code == 200:
                    return
            await asyncio.sleep(interval)


class Membership:
    """This server as a node of a proxy: joining (in the background) until `leave()`."""

    def __init__(self, proxy_url: str, node_url: str, joining: asyncio.Task, admin_key: str | None):
        self.proxy_url = proxy_url
        self.node_url = node_url
        self._joining: asyncio.Task | None = joining
        self._admin_key = admin_key

    async def leave(self) -> None:
        """Stops re-registering and unregisters (once; later calls do nothing)."""
        if self._joining is None:
            return
        joining, self._joining = self._joining, None
        joining.cancel()
        with suppress(asyncio.CancelledError):
            await joining
        await unregister_from_proxy(self.proxy_url, self.node_url, admin_key=self._admin_key)


@asynccontextmanager
async def proxy_membership(proxy_url: str, node_url: str, models: list[str], capacity: int = 1, *,
                           rejoin_interval: float = 30.0, admin_key: str | None = None) -> AsyncIterator[Membership]:
    """Be a node of the proxy while the context is open (enter it in the api_server's lifespan); `admin_key`:
    the proxy's --admin-key, which /nodes/* require when it has one.

    Registration is repeated every `rejoin_interval` seconds (adding a known url is harmless), so a restarted
    proxy, which keeps no state, finds its nodes again.
    """

    async def join() -> None:
        await wait_until_serving(node_url)
        try:
            while True:
                await register_with_proxy(proxy_url, node_url, models, capacity, admin_key=admin_key)
                await asyncio.sleep(rejoin_interval)
        except RegistrationRefused as exc:
            log.error("%s", exc)

    membership = Membership(proxy_url, node_url, asyncio.create_task(join()), admin_key)
    try:
        yield membership
    finally:
        await membership.leave()
