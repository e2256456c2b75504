"""Three real api_server processes on the tiny checkpoint behind the proxy: they join by --proxy-url, every
request succeeds through it with the same output as direct access, and a killed node is skipped, then used again."""

from __future__ import annotations

import threading
from typing import Iterator

import pytest
from openai import OpenAI

from proxy_procs import InProcessServer, Processes, Server, add_node, free_port, node_status, run_requests, wait_until

PROMPT = [151644, 872, 198, 9707]  # plain ids: the same prompt on every node


def healthy(proxy: Server | InProcessServer) -> set[str]:
    return {url for url, node in node_status(proxy).items() if node["healthy"]}


@pytest.fixture(scope="module")
def fleet(tiny_checkpoint) -> Iterator[tuple[Processes, Server, list[Server]]]:
    procs = Processes()
    try:
        port = free_port()
        proxy_url = f"http://127.0.0.1:{port}"
        nodes = [procs.api_server(f"node{i}", tiny_checkpoint, proxy_url=proxy_url) for i in range(3)]
        proxy = procs.proxy("round_robin", port=port, health_interval=0.2)
        for server in [proxy, *nodes]:
            server.wait_ready()
        wait_until(lambda: healthy(proxy) == {n.url for n in nodes}, "the api_servers to join the proxy", timeout=60)
        yield procs, proxy, nodes
    finally:
        procs.close()


def completion(max_tokens: int = 4, stream: bool = False) -> dict:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def test_requests_through_the_proxy_match_direct_access_and_spread_evenly(fleet):
    _, proxy, nodes = fleet
    direct = OpenAI(base_url=nodes[0].url + "/v1", api_key="x", max_retries=0)
    via_proxy = OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in via_proxy.models.list().data] == ["tiny"]
    expected = direct.completions.create(**completion()).choices[0].text
    before = {url: node["routed"] for url, node in node_status(proxy).items()}
    texts = [via_proxy.completions.create(**completion()).choices[0].text for _ in range(30)]
    assert texts == [expected] * 30
    routed = {url: node["routed"] - before[url] for url, node in node_status(proxy).items()}
    assert sorted(routed.values()) == [10, 10, 10]

    stream = via_proxy.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("strategy", ["least_requests", "min_expected_latency", "min_observed_latency", "random"])
def test_every_strategy_serves_real_nodes(fleet, strategy):
    procs, _, nodes = fleet
    proxy = procs.inprocess_proxy(strategy)
    for node in nodes:
        add_node(proxy, node.url, capacity=4, models=["tiny"])
    outcomes = run_requests(proxy.url, [completion(max_tokens=3, stream=i % 2 == 0) for i in range(24)], concurrency=6)
    assert all(o.status == 200 and not (o.stream and o.stream_error()) for o in outcomes)
    routed = [node["routed"] for node in node_status(proxy).values()]
    assert sum(routed) == 24 and all(node["unfinished"] == 0 for node in node_status(proxy).values())


def test_killed_api_server_is_skipped_then_used_again_after_restart(fleet):
    _, proxy, nodes = fleet
    victim = nodes[2]
    ejected_at: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not ejected_at:
            status = node_status(proxy)[victim.url]
            if not status["healthy"]:
                ejected_at.append(status["routed"])
            stop.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        requests = [completion(max_tokens=8, stream=i % 2 == 0) for i in range(100)]
        outcomes = run_requests(proxy.url, requests, concurrency=6, on_progress=lambda done: done == 30 and victim.kill())
        wait_until(lambda: ejected_at, "the killed api_server to be marked unhealthy", timeout=30)
    finally:
        stop.set()
        watcher.join(10)
    failed = [o for o in outcomes if o.status != 200 or (o.stream and o.stream_error())]
    assert all(o.clean_error() for o in failed), failed[:1]
    assert len(failed) <= 6, "only requests in flight on the killed node may fail"
    assert node_status(proxy)[victim.url]["routed"] == ejected_at[0], "nothing is routed to an unhealthy node"

    victim.start()  # same port: it registers again
    victim.wait_ready()
    wait_until(lambda: victim.url in healthy(proxy), "the restarted api_server to be healthy again", timeout=60)
    before = node_status(proxy)[victim.url]["routed"]
    assert all(o.status == 200 for o in run_requests(proxy.url, [completion()] * 9, concurrency=1))
    assert node_status(proxy)[victim.url]["routed"] - before == 3
