"""Prometheus metrics of one api_server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from s1serve.engine.engine import EngineStats

# How a request that the client abandoned ends: its handler is cancelled (serve/disconnect.py) or its response
# stream is closed.
ABORTED = (asyncio.CancelledError, GeneratorExit)


class Outcome:
    """What `ServerMetrics.counted` counts a request as: "ok", "error" or "abort"."""

    def __init__(self) -> None:
        self.value = "ok"

    def failed(self) -> None:
        """The request ended with an error that was answered (an error event in a stream), not raised."""
        self.value = "error"


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
        self.running = Gauge("s1serve_num_requests_running", "Sequences running", registry=self.registry)
        self.waiting = Gauge("s1serve_num_requests_waiting", "Sequences waiting", registry=self.registry)
        self.kv_usage = Gauge("s1serve_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=self.registry)
        self.preemptions = Gauge("s1serve_num_preemptions", "Preemptions since start", registry=self.registry)
        self.prefix_hit_rate = Gauge("s1serve_prefix_cache_hit_ratio", "Prompt tokens found in the prefix cache", registry=self.registry)
        self.prefix_query_tokens = Gauge(
            "s1serve_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache", registry=self.registry
        )
        self.prefix_hit_tokens = Gauge(
            "s1serve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", registry=self.registry
        )
        self.mm_cache_queries = Gauge(
            "s1serve_mm_cache_queries", "Images/videos looked up in the vision-feature cache", registry=self.registry
        )
        self.mm_cache_hits = Gauge(
            "s1serve_mm_cache_hits", "Images/videos whose features came from the cache (not encoded again)",
            registry=self.registry,
        )
        self.spec_draft_tokens = Gauge(
            "s1serve_spec_decode_num_draft_tokens", "Draft tokens verified (n-gram speculation)", registry=self.registry
        )
        self.spec_accepted_tokens = Gauge(
            "s1serve_spec_decode_num_accepted_tokens", "Draft tokens accepted (n-gram speculation)", registry=self.registry
        )

    @contextmanager
    def counted(self, endpoint: str) -> Iterator[Outcome]:
        """Counts one request of `endpoint` in s1serve_requests when the block ends: "abort" if the client went
        away (ABORTED), "error" if it raised anything else or called `failed()`, else "ok"."""
        outcome = Outcome()
        try:
            yield outcome
        except BaseException as exc:
            outcome.value = _failure(exc)
            raise
        finally:
            self.requests.labels(endpoint, outcome.value).inc()

    @contextmanager
    def counted_if_failed(self, endpoint: str) -> Iterator[None]:
        """Counts one request of `endpoint` only if the block raises, as `counted` would: the start of a streamed
        request, whose stream counts it once begun."""
        try:
            yield
        except BaseException as exc:
            self.requests.labels(endpoint, _failure(exc)).inc()
            raise

    def observe_engine(self, stats: EngineStats) -> None:
        """Engine gauges, read at scrape time."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(1 - stats.num_free_blocks / stats.num_blocks)
        self.preemptions.set(stats.num_preemptions)
        self.prefix_hit_rate.set(stats.prefix_hit_tokens / stats.prefix_query_tokens if stats.prefix_query_tokens else 0)
        self.prefix_query_tokens.set(stats.prefix_query_tokens)
        self.prefix_hit_tokens.set(stats.prefix_hit_tokens)
        self.mm_cache_queries.set(stats.mm_cache_queries)
        self.mm_cache_hits.set(stats.mm_cache_hits)
        self.spec_draft_tokens.set(stats.spec_draft_tokens)
        self.spec_accepted_tokens.set(stats.spec_accepted_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _failure(exc: BaseException) -> str:
    """The outcome of a request whose handling raised `exc`."""
    return "abort" if isinstance(exc, ABORTED) else "error"
