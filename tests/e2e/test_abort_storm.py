"""Requests aborted at random points against one real api_server (issue 14): client disconnects, streamed and
not, some in prefill of a long prompt, some under a json_schema constraint, some with n > 1, in concurrent waves
(fixed seed). Afterwards every KV block is free and nothing runs or waits (/metrics), the server's and engine's
threads and file descriptors are back to what they were before the storm, and a fresh greedy request gives the ids
it gave before.

A non-streamed request is aborted when its client disconnects (serve/disconnect.py), so it asks for as many tokens
as a streamed one; the gauge is still awaited (bounded), since an abort lands within a step, not at once.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import httpx
import pytest

from e2e.conftest import start_api_server, stop
from e2e.test_fault_isolation import kv_free

# The issue asks for 1000 (run by hand: S1SERVE_ABORT_STORM_REQUESTS=1000, figures in docs/reliability.md); the
# suite runs 300 (6 waves of 50) to stay within a few minutes on the 2-core CI box.
REQUESTS, WAVE = int(os.environ.get("S1SERVE_ABORT_STORM_REQUESTS", "300")), 50
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]}
FRESH = {"model": "m", "prompt": [1000 + 7 * i for i in range(20)], "max_tokens": 16, "temperature": 0,
         "ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    server = start_api_server(
        tiny_checkpoint, tmp_path_factory.mktemp("storm") / "server.log", "--dtype", "bfloat16", "--model-name", "m",
        "--max-model-len", "4096", "--num-kv-blocks", "1024", "--block-size", "16", "--max-num-batched-tokens", "512",
        # every request of the storm must be taken, so that every one is aborted: the default token limit (the KV
        # cache, 16384) refused one at random when a wave's ~15 long prompts waited at once on a slow CI machine.
        # Refusals have their own tests (test_admission.py).
        "--max-num-queued-tokens", "1048576",
    )
    yield server
    stop(server)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (the engine process and any helpers)."""
    pids = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids += process_tree(int(child))
    return pids


def resources(pid: int) -> tuple[int, int]:
    """Threads and open file descriptors of the server's process tree."""
    tree = process_tree(pid)
    return sum(len(os.listdir(f"/proc/{p}/task")) for p in tree), sum(len(os.listdir(f"/proc/{p}/fd")) for p in tree)


def storm_request(rng: random.Random) -> tuple[str, dict, float | int]:
    """(how it is aborted, body, when): "stream" stops reading after `when` chunks, "post" gives up after `when` s."""
    stream = rng.random() < 0.5
    body: dict = {"model": "m", "stream": stream, "ignore_eos": True, "max_tokens": 400}
    shape = rng.choice(["short", "long", "schema", "n"])
    if shape == "long":  # aborted while its prompt is still being prefilled (~1000 tokens, 512 per step)
        body["messages"] = [{"role": "user", "content": " ".join(f"w{rng.randrange(10**6)}" for _ in range(150))}]
    else:
        body["messages"] = [{"role": "user", "content": f"tell me about {rng.randrange(10**6)}"}]
    if shape == "schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
        body["chat_template_kwargs"] = {"enable_thinking": False}
    if shape == "n":
        body.update(n=rng.choice([2, 3]), temperature=0.8, seed=rng.randrange(1000))
    return ("stream", body, rng.randrange(0, 6)) if stream else ("post", body, rng.uniform(0.0, 0.4))


async def aborted(http: httpx.AsyncClient, how: str, body: dict, when: float | int) -> None:
    if how == "stream":
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            chunks = 0
            async for _ in r.aiter_lines():
                chunks += 1
                if chunks > when:
                    return  # leaving the block closes the connection mid-stream
        return
    try:
        r = await asyncio.wait_for(http.post("/v1/chat/completions", json=body), when)
        assert r.status_code == 200, r.text  # finished before its client gave up
    except asyncio.TimeoutError:
        pass  # the client went away


def test_a_storm_of_aborted_requests_leaves_nothing_behind(server) -> None:
    rng = random.Random(1414)
    plan = [storm_request(rng) for _ in range(REQUESTS)]

    async def run() -> None:
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            fresh = (await http.post("/v1/completions", json=FRESH)).json()["choices"][0]["token_ids"]
            # one wave first, so that thread pools and caches have their working size before counting
            await asyncio.gather(*(aborted(http, *p) for p in plan[:WAVE]))
            await kv_free(http, 60)
            before = resources(server.process.pid)
            for start in range(WAVE, REQUESTS, WAVE):
                async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as wave:
                    await asyncio.gather(*(aborted(wave, *p) for p in plan[start : start + WAVE]))
            await kv_free(http, 60)
            assert (await http.get("/health")).status_code == 200
            after = resources(server.process.pid)
            assert after[0] <= before[0] and after[1] <= before[1] + 4, (before, after)
            again = (await http.post("/v1/completions", json=FRESH)).json()["choices"][0]["token_ids"]
            assert again == fresh
        print(f"{REQUESTS} aborted requests in {time.monotonic() - started:.1f} s; threads, fds {before} -> {after}")

    asyncio.run(asyncio.wait_for(run(), max(400, 1.2 * REQUESTS)))
