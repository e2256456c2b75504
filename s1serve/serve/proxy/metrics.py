"""The proxy's own Prometheus metrics. Per-node series are read from the registry at scrape time, so a removed
node's series disappear with it and nothing is counted twice."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from s1serve.serve.proxy.nodes import NodeRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _NodeCollector(Collector):
    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        node = ["node"]
        routed = CounterMetricFamily("s1serve_proxy_node_routed", "Requests sent to a node (retries included).",
                                     labels=node)
        errors = CounterMetricFamily("s1serve_proxy_node_errors", "Requests to a node that failed (transport or 5xx).",
                                     labels=node)
        unfinished = GaugeMetricFamily("s1serve_proxy_node_unfinished", "Requests in flight on a node.", labels=node)
        healthy = GaugeMetricFamily("s1serve_proxy_node_healthy", "1 if the node is taking requests.", labels=node)
        for node in self.registry.nodes.values():
            routed.add_metric([node.url], node.routed)
            errors.add_metric([node.url], node.errors)
            unfinished.add_metric([node.url], node.unfinished)
            healthy.add_metric([node.url], float(node.healthy))
        yield from (routed, errors, unfinished, healthy)


class ProxyMetrics:
    def __init__(self, registry: NodeRegistry) -> None:
        self.prometheus = CollectorRegistry()
        self.requests = Counter(
            "s1serve_proxy_requests", "Client requests by route and outcome "
            "(ok, upstream_error, proxy_error, stream_error, client_disconnect).",
            ["route", "outcome"], registry=self.prometheus)
        self.retries = Counter("s1serve_proxy_retries", "Requests retried on a second node.", registry=self.prometheus)
        self.prometheus.register(_NodeCollector(registry))

    def render(self) -> bytes:
        return generate_latest(self.prometheus)
