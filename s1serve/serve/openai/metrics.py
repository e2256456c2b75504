"""Prometheus metrics of one api_server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self.requests = Counter(
            "s1serve_requests", "Finished requests by endpoint and outcome", ["endpoint", "outcome"], registry=self.registry
        )
        self.prompt_tokens = Counter("s1serve_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generation_tokens = Counter("s1serve_generation_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram(
            "s1serve_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.tpot = Histogram(
            "s1serve_time_per_output_token_seconds", "Time per output token after the first",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "s1serve_e2e_request_latency_seconds", "Request latency", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self._info = Gauge("s1serve_model_info", "Served model", list(labels), registry=self.registry)
        self._info.labels(**labels).set(1)

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from the engine at scrape time."""
        Gauge(name, doc, registry=self.registry).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
