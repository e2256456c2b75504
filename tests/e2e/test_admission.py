"""Admission control and limits against real api_server processes: a burst of 4x the queue bound is answered 200
or 429 (with Retry-After) at once, a request past --request-timeout is aborted and its KV blocks freed, each cap is
a 400 (413 for the body) naming its limit, and the prompts of one completions request run at once, in order."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from e2e.conftest import start_api_server, stop

MAX_NUM_SEQS = 2
QUEUED = 4
BOUND = MAX_NUM_SEQS + QUEUED  # requests running or queued
MAX_MODEL_LEN = 96
BODY_LIMIT = 200_000


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    running = start_api_server(
        tiny_checkpoint, tmp_path_factory.mktemp("admission") / "server.log",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-queued-reqs", str(QUEUED), "--max-model-len", str(MAX_MODEL_LEN),
        "--num-kv-blocks", "64", "--block-size", "16", "--max-request-body-bytes", str(BODY_LIMIT),
    )
    yield running
    stop(running)


@pytest.fixture(scope="module")
def timeout_server(tiny_checkpoint, tmp_path_factory):
    running = start_api_server(
        tiny_checkpoint, tmp_path_factory.mktemp("timeout") / "server.log",
        "--request-timeout", "1.5", "--num-kv-blocks", "64", "--block-size", "16",
    )
    yield running
    stop(running)


def gauge(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def wait_idle(base_url: str, within: float = 10.0) -> None:
    """Every request gone from the engine and every KV block free (a bound, not a speed)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if gauge(base_url, "s1serve_kv_cache_usage_ratio") == 0 and gauge(base_url, "s1serve_num_requests_running") == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"not idle after {within} s: {httpx.get(f'{base_url}/metrics').text[-2000:]}")


def test_a_burst_of_four_times_the_bound_gets_200_or_429_and_none_hangs(server) -> None:
    count = 4 * BOUND

    async def burst() -> list[tuple[int, float, dict, str]]:
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as http:
            async def one(i: int) -> tuple[int, float, dict, str]:
                start = time.monotonic()
                body = {"prompt": f"request {i}", "max_tokens": 4, "temperature": 0, "stream": i % 4 == 3}
                r = await http.post("/v1/completions", json=body)
                return r.status_code, time.monotonic() - start, dict(r.headers), r.text

            return await asyncio.gather(*(one(i) for i in range(count)))

    results = asyncio.run(burst())
    statuses = [status for status, *_ in results]
    assert set(statuses) <= {200, 429}, statuses
    refused = [(elapsed, headers, text) for status, elapsed, headers, text in results if status == 429]
    assert refused, "a burst over the bound was not refused"
    for _, headers, text in refused:
        assert headers["retry-after"] == "1"
        error = json.loads(text)["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == 429
        assert f"--max-num-seqs + --max-num-queued-reqs = {BOUND}" in error["message"]
    served = 0
    for status, _, headers, text in results:
        if status != 200:
            continue
        if headers["content-type"].startswith("text/event-stream"):
            # A stream begins only once the engine took its request: a refusal is its status, never an event.
            events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
            assert text.rstrip().endswith("data: [DONE]")
            assert not [e for e in events if "error" in e], text
            assert events[-1]["choices"][0]["finish_reason"] == "length"
        else:
            assert json.loads(text)["choices"][0]["finish_reason"] == "length"
        served += 1
    assert served >= BOUND
    times = sorted(elapsed for elapsed, *_ in refused)
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    print(f"burst of {count}: {served} served, {len(refused)} refused with 429; time to 429 p50 "
          f"{times[len(times) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert p99 < 1.0  # the bound on time-to-429
    wait_idle(server.base_url)
    ok = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "after", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_request_timeout_aborts_frees_the_blocks_and_names_the_flag(timeout_server) -> None:
    base = timeout_server.base_url
    long = {"prompt": "tell me everything", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
    r = httpx.post(f"{base}/v1/completions", json=long, timeout=60)
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert "--request-timeout (1.5 s)" in error["message"] and error["type"] == "timeout_error"
    wait_idle(base, within=5)
    with httpx.stream("POST", f"{base}/v1/completions", json={**long, "stream": True}, timeout=60) as stream:
        assert stream.status_code == 200
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["error"]["code"] == 504 and "--request-timeout" in last["error"]["message"]
    wait_idle(base, within=5)
    quick = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert quick.status_code == 200, quick.text


def _chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def _tool(i: int) -> dict:
    return {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object", "properties": {}}}}


CAPS = {
    "prompt over --max-model-len": (
        "/v1/completions", {"prompt": list(range(1, MAX_MODEL_LEN + 1)), "max_tokens": 1}, 400,
        f"maximum context length is {MAX_MODEL_LEN} tokens"),
    "max_tokens over the room left": (
        "/v1/completions", {"prompt": "hello", "max_tokens": MAX_MODEL_LEN}, 400, f"> {MAX_MODEL_LEN}"),
    "n over --max-num-seqs": ("/v1/completions", {"prompt": "a", "n": MAX_NUM_SEQS + 1, "max_tokens": 1}, 400,
                              f"exceeds --max-num-seqs ({MAX_NUM_SEQS})"),
    "n over 128": ("/v1/completions", {"prompt": "a", "n": 129, "max_tokens": 1}, 400, "less than or equal to 128"),
    "top_logprobs over 20": ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=21), 400,
                             "less than or equal to 20"),
    "logprobs over 20": ("/v1/completions", {"prompt": "a", "logprobs": 21, "max_tokens": 1}, 400,
                         "less than or equal to 20"),
    "33 stop strings": ("/v1/chat/completions", _chat(stop=[f"s{i}" for i in range(33)]), 400,
                        "at most 32 stop strings"),
    "a stop string of 513 characters": ("/v1/completions", {"prompt": "a", "stop": ["x" * 513]}, 400,
                                        "at most 512 characters"),
    "129 tools": ("/v1/chat/completions", _chat(tools=[_tool(i) for i in range(129)]), 400, "at most 128 items"),
    "a body over --max-request-body-bytes": (
        "/v1/completions", {"prompt": "a" * BODY_LIMIT}, 413, f"--max-request-body-bytes ({BODY_LIMIT} bytes)"),
}


@pytest.mark.parametrize("case", list(CAPS))
def test_each_cap_is_an_error_naming_its_limit(server, case: str) -> None:
    path, body, status, words = CAPS[case]
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post(path, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert words in error["message"], error
        assert error["code"] == status
        again = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1})
        assert again.status_code == 200, again.text


def test_a_chat_request_without_max_tokens_gets_the_room_left_in_max_model_len(server) -> None:
    r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": False},
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == MAX_MODEL_LEN


def test_the_prompts_of_one_completions_request_run_at_once_in_order(server) -> None:
    prompts = ["The sky", "One two three", "Hello"]
    params = {"max_tokens": 5, "temperature": 1.0, "seed": 11, "n": 2}
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        singles = []
        for prompt in prompts:
            r = http.post("/v1/completions", json={"prompt": prompt, **params})
            assert r.status_code == 200, r.text
            singles += [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        r = http.post("/v1/completions", json={"prompt": prompts, **params})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == list(range(6))
        assert [c["text"] for c in choices] == singles
        streamed = [""] * 6
        with http.stream("POST", "/v1/completions", json={"prompt": prompts, "stream": True, **params}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        streamed[choice["index"]] += choice["text"]
        assert streamed == singles
