"""Each routing strategy over three real stub api_servers: the split of requests is the one the strategy promises.

Slowness is made deterministic where the bound depends on it: a held node answers only when released, and the
bounds below follow from the strategy's rule and the number of clients, not from timing luck.
"""

from __future__ import annotations

import httpx

from proxy_procs import (InProcessServer, Processes, Server, add_node, body, configure, node_status, received,
                         run_requests, state)

CLIENTS = 6


def proxy_over(procs: Processes, upstreams: list[Server], strategy: str,
               capacities: tuple[int, ...] = (1, 1, 1)) -> InProcessServer:
    proxy = procs.inprocess_proxy(strategy)
    for server, capacity in zip(upstreams, capacities):
        assert add_node(proxy, server.url, capacity=capacity)["healthy"]
    return proxy


def assert_all_complete(outcomes: list, max_tokens: int = 4) -> None:
    bad = [o for o in outcomes if not o.complete(max_tokens)]
    assert not bad, f"{len(bad)} of {len(outcomes)} requests failed, first: {bad[0]}"


def test_round_robin_is_exactly_even(procs, upstreams):
    proxy = proxy_over(procs, upstreams, "round_robin")
    assert_all_complete(run_requests(proxy.url, [body()] * 30, concurrency=1))
    assert_all_complete(run_requests(proxy.url, [body(stream=True)] * 30, concurrency=CLIENTS))
    assert received(upstreams) == [20, 20, 20]
    assert [s["routed"] for s in node_status(proxy).values()] == [20, 20, 20]


def test_random_follows_reported_capacity(procs, upstreams):
    proxy = proxy_over(procs, upstreams, "random", capacities=(1, 1, 4))
    assert_all_complete(run_requests(proxy.url, [body()] * 120, concurrency=CLIENTS))
    small_a, small_b, big = received(upstreams)
    # Expected 20 / 20 / 80; the bounds are > 4 standard deviations away.
    assert small_a + small_b + big == 120
    assert big >= 55 and small_a >= 5 and small_b >= 5, (small_a, small_b, big)


def run_with_held_node(proxy: InProcessServer, upstreams: list[Server], n: int) -> list:
    """Requests from CLIENTS clients while upstreams[2] holds whatever it gets until all the others are done."""
    held = upstreams[2]
    configure(held, hold=True)

    def release_when_only_held_remain(done: int) -> None:
        if done + state(held)["held"] == n:
            httpx.post(held.url + "/admin/release", timeout=5).raise_for_status()

    return run_requests(proxy.url, [body()] * n, concurrency=CLIENTS, on_progress=release_when_only_held_remain)


def test_least_requests_avoids_a_stuck_node(procs, upstreams):
    proxy = proxy_over(procs, upstreams, "least_requests")
    assert_all_complete(run_with_held_node(proxy, upstreams, 48))
    fast_a, fast_b, stuck = received(upstreams)
    # A pick sees at most 5 requests in flight, and the stuck node is picked only if it holds no more than the
    # least loaded fast node. Holding 2, it leaves at most 3 to the fast nodes, so one holds <= 1: no third.
    assert stuck <= 2 and fast_a + fast_b + stuck == 48 and min(fast_a, fast_b) >= 10, (fast_a, fast_b, stuck)


def test_min_expected_latency_sends_less_to_a_slow_node(procs, upstreams):
    proxy = proxy_over(procs, upstreams, "min_expected_latency")
    configure(upstreams[2], delay=1.0)
    assert_all_complete(run_requests(proxy.url, [body()] * 48, concurrency=CLIENTS))
    fast_a, fast_b, slow = received(upstreams)
    # Before its first answer the slow node is picked only while it holds <= the fastest node's queue (<= 2 of 5
    # in flight); after it, its measured ~3 rps loses to the fast nodes' queues.
    assert slow <= 3 and fast_a + fast_b + slow == 48 and min(fast_a, fast_b) >= 10, (fast_a, fast_b, slow)
    status = node_status(proxy)
    assert status[upstreams[2].url]["throughput_rps"] < status[upstreams[0].url]["throughput_rps"]


def test_min_observed_latency_tries_each_node_then_avoids_the_slow_one(procs, upstreams):
    proxy = proxy_over(procs, upstreams, "min_observed_latency")
    configure(upstreams[2], delay=0.5)
    assert_all_complete(run_requests(proxy.url, [body()] * 20, concurrency=1))
    fast_a, fast_b, slow = received(upstreams)
    assert 1 <= slow <= 2 and fast_a + fast_b + slow == 20, (fast_a, fast_b, slow)
