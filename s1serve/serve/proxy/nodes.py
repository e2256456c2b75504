"""The nodes behind the proxy: what each serves, what the proxy has measured about it, and whether it is healthy.

Everything here runs on the proxy's one event loop, so the counters need no locks; the proxy is the only
writer of `unfinished`, which is why it is exact for the traffic the proxy itself sends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger("s1serve.proxy")

WINDOW = 16  # completed requests remembered per node for latency and throughput


class Node:
    """One api_server: its registration (models, capacity) and the proxy's measurements of it."""

    def __init__(self, url: str, models: list[str], capacity: int) -> None:
        self.url = url
        self.models = models
        self.capacity = capacity
        self.healthy = False  # until a probe answers
        self.failed_checks = 0
        self.unfinished = 0
        self.routed = 0
        self.errors = 0
        self._latencies: deque[float] = deque(maxlen=WINDOW)
        # Busy clock: seconds during which this node had at least one unfinished request. Completions are
        # stamped with it, so an idle node is not judged slow for having had nothing to do.
        self._busy_total = 0.0
        self._busy_since: float | None = None
        self._completions: deque[float] = deque([0.0], maxlen=WINDOW + 1)

    def begin(self, now: float) -> None:
        if self.unfinished == 0:
            self._busy_since = now
        self.unfinished += 1
        self.routed += 1

    def end(self, now: float, started: float, *, completed: bool, failed: bool) -> None:
        """Close one request begun at `started`. Only completed ones feed latency and throughput; a rejected
        (4xx) or abandoned request is neither a measurement nor the node's failure."""
        if completed:
            self._latencies.append(now - started)
            self._completions.append(self._busy_clock(now))
        self.errors += failed
        self.unfinished -= 1
        if self.unfinished == 0 and self._busy_since is not None:
            self._busy_total += now - self._busy_since
            self._busy_since = None

    def _busy_clock(self, now: float) -> float:
        return self._busy_total + (now - self._busy_since if self._busy_since is not None else 0.0)

    def throughput(self) -> float | None:
        """Completed requests per busy second over the last WINDOW completions; None before the first."""
        done = len(self._completions) - 1
        if done == 0:
            return None
        return done / max(self._completions[-1] - self._completions[0], 1e-6)

    def mean_latency(self) -> float | None:
        return sum(self._latencies) / len(self._latencies) if self._latencies else None

    def serves(self, model: str | None) -> bool:
        return model is None or model in self.models

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "models": self.models,
            "capacity": self.capacity,
            "healthy": self.healthy,
            "unfinished": self.unfinished,
            "latency_s": self.mean_latency(),
            "throughput_rps": self.throughput(),
            "routed": self.routed,
            "errors": self.errors,
        }


def normalize_url(url: str) -> str:
    """`http(s)://host:port[/prefix]` without a trailing slash; anything else is refused."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"node url {url!r} must look like http://host:port")
    return url.strip().rstrip("/")


class NodeRegistry:
    """Nodes by url, in registration order; re-adding a url updates it and keeps its measurements."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.nodes: dict[str, Node] = {}
        self.clock = clock

    def add(self, url: str, models: list[str], capacity: int) -> Node:
        node = self.nodes.get(url)
        if node is None:
            node = self.nodes[url] = Node(url, models, capacity)
        else:
            node.models, node.capacity = models, capacity
        return node

    def remove(self, url: str) -> bool:
        return self.nodes.pop(url, None) is not None

    def models(self) -> list[str]:
        return sorted({m for node in self.nodes.values() for m in node.models})

    def candidates(self, model: str | None, exclude: set[str]) -> list[Node]:
        return [n for n in self.nodes.values() if n.healthy and n.serves(model) and n.url not in exclude]

    def mark_unhealthy(self, node: Node, reason: str) -> None:
        if node.healthy:
            log.warning("node %s marked unhealthy: %s", node.url, reason)
        node.healthy = False


class HealthMonitor:
    """Periodic GET /health on every node, all at once and each with a timeout: one hung node cannot stall a sweep."""

    def __init__(self, registry: NodeRegistry, session: aiohttp.ClientSession, interval: float, timeout: float,
                 unhealthy_after: int) -> None:
        self.registry = registry
        self.session = session
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.unhealthy_after = unhealthy_after

    async def probe(self, node: Node) -> bool:
        """One check; a success re-admits at once, `unhealthy_after` failures in a row eject."""
        try:
            async with self.session.get(f"{node.url}/health", timeout=self.timeout) as response:
                ok = response.status == 200
                reason = f"/health answered {response.status}"
            if ok and not node.models:
                node.models = await self._models_of(node)
        except Exception as exc:  # any failure of one node is that node's problem, never the sweep's
            ok, reason = False, f"/health failed: {type(exc).__name__}: {exc}"
        if ok:
            if not node.healthy:
                log.info("node %s is healthy", node.url)
            node.healthy, node.failed_checks = True, 0
        else:
            node.failed_checks += 1
            if node.failed_checks >= self.unhealthy_after:
                self.registry.mark_unhealthy(node, reason)
        return ok

    async def model_cards(self, node: Node) -> list[dict[str, Any]]:
        """The node's own /v1/models cards."""
        async with self.session.get(f"{node.url}/v1/models", timeout=self.timeout) as response:
            response.raise_for_status()
            return [card for card in (await response.json())["data"] if isinstance(card, dict) and "id" in card]

    async def _models_of(self, node: Node) -> list[str]:
        """For nodes added without a model list: ask the node itself."""
        return [card["id"] for card in await self.model_cards(node)]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            nodes = list(self.registry.nodes.values())
            await asyncio.gather(*(self.probe(node) for node in nodes))
