"""Routing strategies: which of the candidate nodes gets the next request.

Ties are broken at random (a seeded `random.Random`), so idle nodes share the load instead of the first one
in the list taking all of it.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # only annotations: `s1serve --help` builds the proxy's parser without importing aiohttp
    from s1serve.serve.proxy.nodes import Node

STRATEGIES = ("random", "round_robin", "least_requests", "min_expected_latency", "min_observed_latency")


def throughputs(nodes: Sequence[Node]) -> list[float]:
    """Each node's throughput (requests per busy second), with a prior for nodes not measured yet.

    An unmeasured node is assumed as fast per unit of capacity as the mean measured node; when none is
    measured, capacity itself stands in (only ratios matter).
    """
    measured = [(n.throughput(), n.capacity) for n in nodes]
    per_capacity = [t / c for t, c in measured if t is not None]
    scale = sum(per_capacity) / len(per_capacity) if per_capacity else 1.0
    return [t if t is not None else scale * c for t, c in measured]


def expected_latencies(nodes: Sequence[Node]) -> list[float]:
    """E_i = (unfinished_i + 1) / throughput_i: time for node i to finish its queue and the new request."""
    return [(n.unfinished + 1) / t for n, t in zip(nodes, throughputs(nodes))]


def observed_latencies(nodes: Sequence[Node]) -> list[float]:
    """Mean of the last completed requests' latencies. A node without history scores 0 while idle, so it gets
    tried, and +inf while that first request is in flight: it is tried, not flooded, until it has answered."""
    return [latency if (latency := n.mean_latency()) is not None else (math.inf if n.unfinished else 0.0)
            for n in nodes]


class Router:
    def __init__(self, strategy: str, rng: random.Random) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"routing strategy {strategy!r} is unknown; allowed: {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.rng = rng
        self._next = 0
        self._pick: Callable[[Sequence[Node]], Node] = getattr(self, f"_{strategy}")

    def pick(self, nodes: Sequence[Node]) -> Node:
        """One of `nodes` (non-empty, all healthy and serving the request's model)."""
        return self._pick(nodes)

    def _argmin(self, nodes: Sequence[Node], scores: Sequence[Any]) -> Node:
        best = min(scores)
        return self.rng.choice([n for n, s in zip(nodes, scores) if s == best])

    def _random(self, nodes: Sequence[Node]) -> Node:
        return self.rng.choices(nodes, weights=[n.capacity for n in nodes])[0]

    def _round_robin(self, nodes: Sequence[Node]) -> Node:
        node = nodes[self._next % len(nodes)]
        self._next += 1
        return node

    def _least_requests(self, nodes: Sequence[Node]) -> Node:
        return self._argmin(nodes, [n.unfinished for n in nodes])

    def _min_expected_latency(self, nodes: Sequence[Node]) -> Node:
        return self._argmin(nodes, expected_latencies(nodes))

    def _min_observed_latency(self, nodes: Sequence[Node]) -> Node:
        # Equal scores (in practice: every node still waiting for its first answer) go to the least loaded.
        return self._argmin(nodes, [(s, n.unfinished) for s, n in zip(observed_latencies(nodes), nodes)])
