"""Pass-through to real stub processes: bytes unchanged, disconnects reach the node, failures retried or reported."""

from __future__ import annotations

import json
import re
from typing import Iterator

import httpx
import pytest

from proxy_procs import (InProcessServer, Processes, Server, add_node, body, configure, free_port, node_status,
                         path_of, received, run_requests, state, wait_until)


@pytest.fixture(scope="module")
def proxy(shared_upstreams: list[Server]) -> Iterator[InProcessServer]:
    """One round-robin proxy over the three shared stubs for this module's tests."""
    processes = Processes()
    try:
        server = processes.inprocess_proxy("round_robin")
        for upstream in shared_upstreams:
            add_node(server, upstream.url)
        yield server
    finally:
        processes.close()


def metric(proxy: InProcessServer, name: str) -> float:
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_responses_are_byte_for_byte_those_of_the_node(proxy, upstreams, stream, chat):
    request = body(stream=stream, chat=chat, max_tokens=6)
    direct = httpx.post(upstreams[0].url + path_of(request), json=request, timeout=10)
    for _ in range(3):  # every node, round robin
        through = httpx.post(proxy.url + path_of(request), json=request, timeout=10)
        assert through.status_code == direct.status_code == 200
        assert through.content == direct.content
        assert through.headers["content-type"] == direct.headers["content-type"]
        assert through.headers["x-stub-node"] in {"n0", "n1", "n2"}


def test_upstream_errors_pass_through_unchanged(proxy, upstreams):
    request = body(max_tokens=0)
    direct = httpx.post(upstreams[0].url + "/v1/completions", json=request, timeout=10)
    through = httpx.post(proxy.url + "/v1/completions", json=request, timeout=10)
    assert (through.status_code, through.content) == (direct.status_code, direct.content) == (400, direct.content)


def test_unknown_model_is_a_404_naming_the_served_ones(proxy, upstreams):
    response = httpx.post(proxy.url + "/v1/completions", json=body(model="no-such-model"), timeout=10)
    assert response.status_code == 404
    assert "'no-such-model' is not served here; served: ['stub-model']" in response.json()["error"]["message"]
    assert sum(received(upstreams)) == 0


def test_models_and_health_of_the_proxy(proxy, upstreams):
    models = httpx.get(proxy.url + "/v1/models", timeout=10).json()
    assert [card["id"] for card in models["data"]] == ["stub-model"]
    assert httpx.get(proxy.url + "/health", timeout=10).json()["healthy_nodes"] == 3


def test_client_disconnect_mid_stream_closes_the_upstream_stream(proxy, upstreams):
    for server in upstreams:
        configure(server, chunk_delay=0.2)
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", proxy.url + "/v1/completions", json=body(stream=True, max_tokens=100)) as response:
            first = next(response.iter_raw())
            assert first.startswith(b"data: ")
    # The node stops generating (its stream is cancelled) long before its 20 s of tokens would have ended.
    wait_until(lambda: sum(state(s)["cancelled"] for s in upstreams) == 1, "the node to see the disconnect")
    wait_until(lambda: all(n["unfinished"] == 0 for n in node_status(proxy).values()), "the proxy to close the request")
    assert metric(proxy, "s1serve_proxy_requests_total") >= 1


def test_client_disconnect_before_the_first_byte_closes_the_upstream_request(proxy, upstreams):
    for server in upstreams:
        configure(server, hold=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + "/v1/completions", json=body(stream=True), timeout=httpx.Timeout(10, read=0.5))
    wait_until(lambda: sum(state(s)["cancelled"] for s in upstreams) == 1, "the held node to see the disconnect")
    wait_until(lambda: all(n["unfinished"] == 0 for n in node_status(proxy).values()), "the proxy to close the request")


def test_failure_before_the_first_byte_is_retried_once_on_another_node(proxy, upstreams):
    configure(upstreams[0], break_at=0)  # headers, then the connection drops
    retries = metric(proxy, "s1serve_proxy_retries_total")
    requests = [body(stream=True), body(stream=True, chat=True), body(stream=True)]
    outcomes = run_requests(proxy.url, requests, concurrency=1)
    assert all(o.complete(4) for o in outcomes), outcomes
    broken, *good = received(upstreams)
    assert broken >= 1 and sum(good) == 3  # round robin reaches n0 at least once in 3 requests
    assert metric(proxy, "s1serve_proxy_retries_total") - retries == broken


def test_failure_after_bytes_were_sent_ends_the_stream_with_an_error_event(proxy, upstreams):
    for server in upstreams:
        configure(server, break_at=2)
    [outcome] = run_requests(proxy.url, [body(stream=True, max_tokens=5)], concurrency=1)
    events = outcome.events()
    assert outcome.status == 200 and len(events) == 4 and events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["tok0 ", "tok1 "]
    assert "failed mid-stream" in json.loads(events[2])["error"]["message"]
    assert sum(received(upstreams)) == 1  # not retried: the client already had part of the answer


def test_node_roles_other_than_hybrid_are_refused(proxy, upstreams):
    response = httpx.post(proxy.url + "/nodes/add", json={"url": "http://127.0.0.1:1", "status": {"role": "Prefill"}})
    assert response.status_code == 400 and "not supported yet" in response.json()["error"]["message"]
    response = httpx.post(proxy.url + "/nodes/add", json={"url": "not-a-url"})
    assert response.status_code == 400 and "must look like http://host:port" in response.json()["error"]["message"]
    assert httpx.post(proxy.url + "/nodes/remove", params={"node_url": "http://127.0.0.1:1"}).status_code == 404
    assert len(node_status(proxy)) == 3


def test_proxy_without_healthy_nodes_answers_503(procs):
    lonely = procs.inprocess_proxy("min_expected_latency")
    assert httpx.get(lonely.url + "/health").status_code == 503
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert add_node(lonely, nowhere, models=["stub-model"])["healthy"] is False  # joins, but unhealthy
    response = httpx.post(lonely.url + "/v1/completions", json=body(), timeout=10)
    assert response.status_code == 503
    assert "no healthy node serves model 'stub-model'" in response.json()["error"]["message"]
