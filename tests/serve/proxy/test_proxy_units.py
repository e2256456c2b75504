"""The proxy's measurements, routing rules and flag checks, in-process on real Node objects with explicit clocks."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from s1serve.serve.proxy.config import ProxyConfig, ProxyConfigError, main_proxy
from s1serve.serve.proxy.forward import events_end, requested_model
from s1serve.serve.proxy.nodes import Node, normalize_url
from s1serve.serve.proxy.registration import advertised_url
from s1serve.serve.proxy.routing import Router, expected_latencies, throughputs


def node(name: str, capacity: int = 1) -> Node:
    n = Node(f"http://{name}:1", ["m"], capacity)
    n.healthy = True
    return n


def serve(n: Node, intervals: list[tuple[float, float]]) -> None:
    """Record requests that ran over the given (start, end) intervals, in time order of events."""
    events = sorted([(s, 0, s) for s, _ in intervals] + [(e, 1, s) for s, e in intervals])
    for t, is_end, started in events:
        if is_end:
            n.end(t, started, completed=True, failed=False)
        else:
            n.begin(t)


def test_throughput_counts_busy_time_only():
    serial = node("serial")
    serve(serial, [(0, 1), (1, 2), (2, 3)])
    assert serial.throughput() == pytest.approx(1.0)
    idle_between = node("idle")
    serve(idle_between, [(0, 1), (100, 101), (500, 501)])  # idle gaps do not make a node look slow
    assert idle_between.throughput() == pytest.approx(1.0)
    batching = node("batching")
    serve(batching, [(0, 2)] * 4)  # four at once, 2 s each: 2 requests per second
    assert batching.throughput() == pytest.approx(2.0)
    assert batching.mean_latency() == pytest.approx(2.0) and batching.unfinished == 0


def test_failed_and_abandoned_requests_are_not_measurements():
    n = node("n")
    n.begin(0.0)
    n.end(0.01, 0.0, completed=False, failed=True)
    n.begin(1.0)
    n.end(1.5, 1.0, completed=False, failed=False)
    assert n.throughput() is None and n.mean_latency() is None
    assert (n.routed, n.errors, n.unfinished) == (2, 1, 0)


def test_expected_latency_formula_and_prior():
    fast, slow, new = node("fast"), node("slow"), node("new", capacity=2)
    serve(fast, [(0, 0.1)])  # 10 rps
    serve(slow, [(0, 1.0)])  # 1 rps
    assert throughputs([fast, slow, new]) == pytest.approx([10.0, 1.0, 11.0])  # new: mean per capacity (5.5) x 2
    fast.begin(5.0), fast.begin(5.0)
    assert expected_latencies([fast, slow, new]) == pytest.approx([3 / 10, 1 / 1, 1 / 11])
    router = Router("min_expected_latency", random.Random(0))
    assert router.pick([fast, slow, new]) is new
    assert router.pick([fast, slow]) is fast  # 0.3 s beats 1 s even with two queued
    for _ in range(10):
        fast.begin(5.0)
    assert router.pick([fast, slow]) is slow  # 12 queued on fast: 1.2 s


def test_unmeasured_nodes_fall_back_to_capacity_ratios():
    small, big = node("small", 1), node("big", 4)
    assert throughputs([small, big]) == [1.0, 4.0]
    router = Router("min_expected_latency", random.Random(0))
    big.begin(0.0), big.begin(0.0)
    assert router.pick([small, big]) is big  # 3/4 < 1/1
    big.begin(0.0), big.begin(0.0)
    assert router.pick([small, big]) is small  # 5/4 > 1/1


def test_round_robin_is_exactly_even():
    nodes = [node(f"n{i}") for i in range(3)]
    router = Router("round_robin", random.Random(0))
    counts = Counter(router.pick(nodes).url for _ in range(300))
    assert sorted(counts.values()) == [100, 100, 100]


def test_least_requests_picks_the_least_loaded_and_spreads_ties():
    a, b, c = node("a"), node("b"), node("c")
    a.begin(0), a.begin(0), b.begin(0)
    router = Router("least_requests", random.Random(0))
    assert router.pick([a, b, c]) is c
    ties = Counter(router.pick([b, c, node("d")]).url for _ in range(300))
    assert ties["http://b:1"] == 0 and min(ties.values()) > 100  # c and d (idle) share; b has one in flight


def test_random_is_weighted_by_capacity():
    nodes = [node("a", 1), node("b", 1), node("c", 2)]
    router = Router("random", random.Random(1234))
    counts = Counter(router.pick(nodes).url for _ in range(8000))
    shares = [counts[n.url] / 8000 for n in nodes]
    assert shares == pytest.approx([0.25, 0.25, 0.5], abs=0.03)  # > 5 standard deviations of slack


def test_min_observed_latency_tries_new_nodes_then_prefers_the_fastest():
    fast, slow, new = node("fast"), node("slow"), node("new")
    serve(fast, [(0, 0.1), (1, 1.2)])
    serve(slow, [(0, 1.0)])
    router = Router("min_observed_latency", random.Random(0))
    assert router.pick([fast, slow, new]) is new
    assert router.pick([fast, slow]) is fast


def test_min_observed_latency_tries_a_new_node_once_until_it_answers():
    fast, new = node("fast"), node("new")
    serve(fast, [(0, 0.1)])
    router = Router("min_observed_latency", random.Random(0))
    assert router.pick([fast, new]) is new
    new.begin(1.0)
    assert all(router.pick([fast, new]) is fast for _ in range(20))  # not flooded while its first request runs
    new.end(3.0, 1.0, completed=True, failed=False)
    assert router.pick([fast, new]) is fast  # measured: 2 s against 0.1 s
    a, b, c = node("a"), node("b"), node("c")  # none measured, all busy: spread like least_requests
    a.begin(0), a.begin(0), b.begin(0), c.begin(0)
    assert {router.pick([a, b, c]).url for _ in range(50)} == {b.url, c.url}


def test_router_refuses_unknown_strategy():
    with pytest.raises(ValueError, match="allowed: random, round_robin"):
        Router("fastest", random.Random(0))


def test_event_boundaries_and_model_field():
    assert events_end(b"data: a\n\ndata: b") == len(b"data: a\n\n")
    assert events_end(b"data: a\r\n\r\ndata: b\r\n") == len(b"data: a\r\n\r\n")
    assert events_end(b"data: partial") == 0
    assert requested_model(b'{"model": "m", "prompt": "x"}') == "m"
    assert requested_model(b'{"prompt": "x"}') is None
    assert requested_model(b"not json") is None and requested_model(b"[1]") is None


def test_node_urls_are_normalized_or_refused():
    assert normalize_url(" http://h:8000/ ") == "http://h:8000"
    for bad in ("h:8000", "ftp://h:1", "http://"):
        with pytest.raises(ValueError, match="must look like http://host:port"):
            normalize_url(bad)


def test_advertised_url_replaces_wildcard_addresses():
    assert advertised_url("127.0.0.1", 9000, "http://127.0.0.1:8000") == "http://127.0.0.1:9000"
    url = advertised_url("0.0.0.0", 9000, "http://127.0.0.1:8000")
    assert url == "http://127.0.0.1:9000"  # the interface on the route to the proxy


def test_distserve_is_refused_with_a_sentence(capsys):
    with pytest.raises(ProxyConfigError, match="DistServe .* is not supported yet; use Hybrid"):
        ProxyConfig(serving_strategy="DistServe")
    assert main_proxy(["--serving-strategy", "DistServe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --serving-strategy DistServe")


def test_bad_flag_values_are_refused():
    with pytest.raises(ProxyConfigError, match="--health-interval"):
        ProxyConfig(health_interval=0)
    with pytest.raises(ProxyConfigError, match="--unhealthy-after"):
        ProxyConfig(unhealthy_after=0)
