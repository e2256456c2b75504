"""A request that fails while the engine or the API server handles it fails alone (issue 14, item 2).

One real api_server runs with the test-only fault hook (S1SERVE_TEST_FAULT): each stage raises for a request whose
prompt holds that stage's marker token. For each stage, the faulty request (streamed and not: every stage raises
before the first token, so before a stream begins) answers a JSON 500 naming the stage, 100 concurrent other
requests give the greedy ids of a clean run, /health stays 200 and every KV block is free afterwards. bf16 (the checkpoint's dtype): batched ids equal alone ids.
The request that used to stop the engine (json_object with ignore_eos) is tests/e2e/test_bad_requests.py's.
"""

from __future__ import annotations

import asyncio
import base64
import random

import httpx
import pytest

from e2e.conftest import start_api_server, stop
from multimodal.media_samples import png_bytes

WORDS = {"sampler": "zebra", "grammar": "walrus", "detokenizer": "quokka", "stop": "narwhal", "vision": "pangolin",
         "parser": "axolotl"}
OTHERS, NEW_TOKENS = 100, 6


@pytest.fixture(scope="module")
def markers(tiny_checkpoint) -> dict[str, int]:
    from s1serve.tokenizer.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    return {stage: tokenizer.encode(word)[-1] for stage, word in WORDS.items()}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory, markers):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("S1SERVE_TEST_FAULT", ",".join(f"{stage}:{marker}" for stage, marker in markers.items()))
        server = start_api_server(
            tiny_checkpoint, tmp_path_factory.mktemp("faults") / "server.log", "--dtype", "bfloat16",
            "--model-name", "m", "--reasoning-parser", "intern-s1", "--tool-call-parser", "qwen3",
            "--max-model-len", "2048", "--num-kv-blocks", "512", "--block-size", "16",
        )
    yield server
    stop(server)


def other_prompts(markers: dict[str, int]) -> list[list[int]]:
    rng = random.Random(14)
    banned = set(markers.values())
    return [[t for t in (rng.randrange(1000, 150000) for _ in range(rng.randint(3, 40))) if t not in banned]
            for _ in range(OTHERS)]


async def complete(http: httpx.AsyncClient, prompt: list[int]) -> list[int]:
    r = await http.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": NEW_TOKENS,
                                                 "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def faulty_body(stage: str, stream: bool) -> dict:
    text = f"{WORDS[stage]} says hi"
    content: list | str = text
    if stage == "vision":
        url = "data:image/png;base64," + base64.b64encode(png_bytes(56, 56)).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS, "stream": stream,
            "temperature": 0.7, "n": 2, "stop": ["zz"], "ignore_eos": True}
    if stage == "grammar":
        body["response_format"] = {"type": "json_object"}
    return body


async def faulty(http: httpx.AsyncClient, stage: str, stream: bool) -> None:
    """The faulty request fails alone, naming its stage. Every stage raises before the first token, so a streamed
    request gets the error as its status too: a stream begins only with the request's first output."""
    expected = f"internal error in {stage} for this request: InjectedFault: fault injected into the {stage} stage"
    r = await http.post("/v1/chat/completions", json=faulty_body(stage, stream))
    assert r.status_code == 500 and r.headers["content-type"] == "application/json", (r.status_code, r.text)
    error = r.json()["error"]
    assert error["message"].startswith(expected) and error["type"] == "internal_server_error", error


async def kv_free(http: httpx.AsyncClient, wait_s: float = 10.0) -> None:
    """Every KV block free, nothing running or waiting (bounded wait: the engine reports at its next step)."""
    for _ in range(int(wait_s * 10)):
        text = (await http.get("/metrics")).text
        gauges = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith(("s1serve_kv_cache_usage_ratio", "s1serve_num_requests_"))}
        if not any(gauges.values()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"blocks still held: {gauges}")


@pytest.fixture(scope="module")
def clean_run(server, markers) -> list[list[int]]:
    """The 100 other requests' greedy ids, run concurrently with no faulty request."""
    async def run() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            # the marker words reach the engine as their marker ids
            for stage in WORDS:
                r = await http.post("/tokenize", json={"model": "m", "messages": faulty_body(stage, False)["messages"]})
                assert markers[stage] in r.json()["tokens"], (stage, r.text)
            return await asyncio.gather(*(complete(http, p) for p in other_prompts(markers)))

    return asyncio.run(run())


@pytest.mark.parametrize("stage", list(WORDS))
def test_a_fault_in_one_request_fails_that_request_only(server, markers, clean_run, stage: str) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=httpx.Limits(max_connections=200)) as http:
            others = [complete(http, p) for p in other_prompts(markers)]
            middle = len(others) // 2
            results = await asyncio.gather(
                *others[:middle], faulty(http, stage, False), faulty(http, stage, True), *others[middle:]
            )
            assert [r for r in results if r is not None] == clean_run
            assert (await http.get("/health")).status_code == 200
            await kv_free(http)

    asyncio.run(run())


@pytest.mark.parametrize("stream", [False, True])
def test_the_error_reaches_the_responses_and_messages_routes(server, stream: bool) -> None:
    expected = "internal error in sampler for this request: InjectedFault"
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        r = http.post("/v1/responses", json={"model": "m", "input": "zebra says hi", "max_output_tokens": 4, "stream": stream})
        assert r.status_code == 500 and r.json()["error"]["message"].startswith(expected), r.text
        r = http.post("/v1/messages", json={"model": "m", "max_tokens": 4, "stream": stream,
                                            "messages": [{"role": "user", "content": "zebra says hi"}]})
        assert r.status_code == 500, r.text
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error", r.text
        assert r.json()["error"]["message"].startswith(expected), r.text
        assert http.get("/health").status_code == 200
