"""Nodes joining with --proxy-url, leaving, dying and coming back: `python -m s1serve.serve.proxy` and stub
api_server processes, started together (the nodes retry until the proxy answers)."""

from __future__ import annotations

import asyncio
import threading

import httpx

from proxy_procs import (InProcessServer, Processes, Server, body, configure, free_port, node_status, received,
                         run_requests, state, wait_until)
from s1serve.serve.proxy.registration import register_with_proxy


def healthy_urls(proxy: Server | InProcessServer) -> set[str]:
    return {url for url, node in node_status(proxy).items() if node["healthy"]}


def cluster(procs: Processes, strategy: str, **node_options: dict) -> tuple[Server, list[Server]]:
    """A proxy process and three nodes joining it by --proxy-url, all starting at once."""
    port = free_port()
    proxy_url = f"http://127.0.0.1:{port}"
    nodes = [procs.upstream(name, proxy_url=proxy_url, **options) for name, options in node_options.items()]
    proxy = procs.proxy(strategy, port=port, health_interval=0.2)
    for server in [proxy, *nodes]:
        server.wait_ready()
    wait_until(lambda: healthy_urls(proxy) == {n.url for n in nodes}, "the nodes to register", timeout=30)
    return proxy, nodes


def test_registration_retries_until_the_proxy_answers(procs: Processes, upstreams):
    port = free_port()

    async def register_then_start_proxy() -> InProcessServer:
        joining = asyncio.create_task(register_with_proxy(f"http://127.0.0.1:{port}", upstreams[0].url, ["stub-model"]))
        await asyncio.sleep(0.6)  # a few refused attempts
        assert not joining.done()
        proxy = await asyncio.to_thread(procs.inprocess_proxy, "round_robin", server_port=port)
        await asyncio.wait_for(joining, 15)
        return proxy

    proxy = asyncio.run(register_then_start_proxy())
    assert healthy_urls(proxy) == {upstreams[0].url}


def test_nodes_rejoin_a_restarted_proxy(procs: Processes):
    import upstream_app

    first = procs.inprocess_proxy("round_robin")
    port = int(first.url.rsplit(":", 1)[1])
    node_port = free_port()
    node = procs.inprocess(upstream_app.create_app("n", ["stub-model"], 1, first.url, node_port, rejoin_interval=0.2),
                           "node", node_port)
    wait_until(lambda: healthy_urls(first) == {node.url}, "the node to join")
    first.stop()
    second = procs.inprocess_proxy("round_robin", server_port=port)  # a fresh proxy, no state
    wait_until(lambda: healthy_urls(second) == {node.url}, "the node to rejoin")


def test_nodes_join_by_proxy_url_serve_their_models_and_leave_on_shutdown(procs: Processes):
    proxy, nodes = cluster(procs, "min_expected_latency", n0={}, n1={},
                           n2={"models": ("stub-model", "other-model"), "capacity": 4})
    assert node_status(proxy)[nodes[2].url]["models"] == ["stub-model", "other-model"]
    assert node_status(proxy)[nodes[2].url]["capacity"] == 4

    models = httpx.get(proxy.url + "/v1/models", timeout=10).json()["data"]
    assert sorted(card["id"] for card in models) == ["other-model", "stub-model"]

    requests = [body(stream=i % 2 == 0, chat=i % 3 == 0) for i in range(30)]
    outcomes = run_requests(proxy.url, requests, concurrency=4)
    assert all(o.complete(4) for o in outcomes), [o for o in outcomes if not o.complete(4)][:1]
    before = received(nodes)
    outcomes = run_requests(proxy.url, [body(model="other-model", stream=True)] * 10, concurrency=4)
    assert all(o.complete(4) for o in outcomes)
    assert [a - b for a, b in zip(received(nodes), before)] == [0, 0, 10]  # only n2 serves other-model

    nodes[0].stop()  # graceful: its lifespan unregisters it
    wait_until(lambda: set(node_status(proxy)) == {nodes[1].url, nodes[2].url}, "n0 to unregister")


def test_killed_node_is_skipped_then_used_again_after_restart(procs: Processes):
    proxy, nodes = cluster(procs, "round_robin", n0={}, n1={}, n2={})
    for node in nodes:
        configure(node, chunk_delay=0.01)  # streams of ~50 ms, so some are in flight at the kill
    victim = nodes[1]

    # A watcher records the victim's routed count at the first moment the proxy reports it unhealthy.
    routed_when_ejected: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not routed_when_ejected:
            status = node_status(proxy)[victim.url]
            if not status["healthy"]:
                routed_when_ejected.append(status["routed"])
            stop.wait(0.01)

    def kill_at_30(done: int) -> None:
        if done == 30:
            victim.kill()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        requests = [body(stream=i % 2 == 0, max_tokens=5, chat=i % 4 == 1) for i in range(100)]
        outcomes = run_requests(proxy.url, requests, concurrency=6, on_progress=kill_at_30)
        wait_until(lambda: routed_when_ejected, "the killed node to be marked unhealthy")
    finally:
        stop.set()
        watcher.join(10)

    errors = [o for o in outcomes if not o.complete(5)]
    assert all(o.clean_error() for o in errors), errors[:1]
    assert all(o.stream and o.status == 200 for o in errors)  # only streams that had started can fail
    assert len(errors) <= 6  # at most the requests in flight on the victim
    assert node_status(proxy)[victim.url]["routed"] == routed_when_ejected[0]  # nothing routed to it since
    assert all(node["unfinished"] == 0 for node in node_status(proxy).values())  # no count leaked by the failures

    victim.start()  # same port; it registers again
    victim.wait_ready()
    wait_until(lambda: victim.url in healthy_urls(proxy), "the restarted node to be healthy again")
    outcomes = run_requests(proxy.url, [body()] * 30, concurrency=1)
    assert all(o.complete(4) for o in outcomes)
    assert state(victim)["received"] == 10  # round robin over three healthy nodes again


def test_a_node_refusing_connections_is_ejected_at_once_and_the_request_retried(procs: Processes, upstreams):
    import upstream_app

    proxy = procs.inprocess_proxy("round_robin", health_interval=60)  # no health sweep during this test
    doomed = procs.inprocess(upstream_app.create_app("doomed", ["stub-model"], 1, None, 0), "doomed")
    for url in (doomed.url, upstreams[0].url):
        httpx.post(proxy.url + "/nodes/add", json={"url": url}, timeout=10).raise_for_status()
    doomed.stop()
    outcomes = run_requests(proxy.url, [body(), body(stream=True)], concurrency=1)
    assert all(o.complete(4) for o in outcomes)
    assert received(upstreams)[0] == 2
    assert healthy_urls(proxy) == {upstreams[0].url}
    assert node_status(proxy)[doomed.url]["routed"] == 1  # once, then skipped


def test_failing_health_checks_eject_a_node_and_passing_ones_readmit_it(procs: Processes, upstreams):
    proxy = procs.inprocess_proxy("round_robin", health_interval=0.1, unhealthy_after=2)
    for node in upstreams:
        httpx.post(proxy.url + "/nodes/add", json={"url": node.url}, timeout=10).raise_for_status()  # models asked
    assert node_status(proxy)[upstreams[0].url]["models"] == ["stub-model"]
    sick = upstreams[0]
    configure(sick, healthy=False)
    wait_until(lambda: sick.url not in healthy_urls(proxy), "the failing node to be ejected")
    assert httpx.get(proxy.url + "/health", timeout=5).json()["healthy_nodes"] == 2
    assert all(o.complete(4) for o in run_requests(proxy.url, [body()] * 20, concurrency=4))
    assert received(upstreams)[0] == 0

    configure(sick, healthy=True)
    wait_until(lambda: sick.url in healthy_urls(proxy), "the node to be readmitted")
    assert all(o.complete(4) for o in run_requests(proxy.url, [body()] * 30, concurrency=1))
    assert received(upstreams)[0] == 10
