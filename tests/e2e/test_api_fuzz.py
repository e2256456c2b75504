"""Schemathesis over the api_server's own OpenAPI schema: every route, valid and invalid generated requests.

Each answer must come within REQUEST_TIMEOUT_S (else it counts as a hang), never be a 5xx (nor a 5xx error event
inside a 200 stream), and every 4xx must be JSON in the route's error shape. Afterwards /health is 200 and a
greedy request gives what it gave before the run. Generation is derandomized, so CI runs the same requests each
time; S1SERVE_FUZZ_SCALE multiplies the example counts for a longer run by hand.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from e2e.conftest import start_api_server, stop

REQUEST_TIMEOUT_S = 60.0
SCALE = float(os.environ.get("S1SERVE_FUZZ_SCALE", "1"))
# Examples per operation and mode. Routes that generate text get fewer: each valid one decodes a few tokens.
GENERATING = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}
EXAMPLES = {("generating", "positive"): 50, ("generating", "negative"): 250, ("other", "positive"): 150, ("other", "negative"): 250}
# Valid requests are made cheap: at most this many tokens and choices each (the server's own bound, the context
# left by --max-model-len, would still hold without it, but decoding 100 choices of 100 tokens takes minutes).
TOKEN_FIELDS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}
MAX_TOKENS, MAX_N = 4, 2
GREEDY = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def fuzz_server(tiny_checkpoint, tmp_path_factory):
    server = start_api_server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("fuzz") / "server.log",
        "--model-name", "intern-s1-pro",
        "--reasoning-parser", "intern-s1",
        "--tool-call-parser", "qwen3",
        "--max-model-len", "128",
        "--num-kv-blocks", "128",
        "--block-size", "16",
    )
    yield server
    stop(server)


def _cheap(path: str, body: object) -> object:
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for field in TOKEN_FIELDS.get(path, ()):
        value = body.get(field)
        if value is None and field == TOKEN_FIELDS[path][0]:
            body[field] = MAX_TOKENS
        elif isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[field] = MAX_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and MAX_N < n <= 128:  # above 128 stays: a 400 to check
        body["n"] = MAX_N
    return body


def _error_shape_problem(path: str, status: int, text: str) -> str | None:
    """Why an error body is not the route's error shape, or None."""
    try:
        body = json.loads(text)
    except ValueError:
        return f"not JSON: {text[:200]!r}"
    if path.startswith("/v1/messages"):
        error = body.get("error") if isinstance(body, dict) and body.get("type") == "error" else None
        if not (isinstance(error, dict) and isinstance(error.get("type"), str) and isinstance(error.get("message"), str)):
            return f"not Anthropic's error shape: {text[:200]}"
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("message"), str) and error.get("message")
            and isinstance(error.get("type"), str) and "param" in error and error.get("code") == status):
        return f"not OpenAI's error shape: {text[:200]}"
    return None


def _stream_problem(text: str) -> str | None:
    """A 5xx error event inside a 200 event stream."""
    for line in text.splitlines():
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[len("data: "):])
        error = event.get("error") if isinstance(event, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        if (isinstance(code, int) and code >= 500) or kind in ("internal_server_error", "api_error"):
            return f"5xx error event in the stream: {line[:300]}"
    return None


def _greedy(base_url: str) -> list[int]:
    r = httpx.post(f"{base_url}/v1/completions", json={**GREEDY, "return_token_ids": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_generated_requests_over_every_route_get_no_5xx_no_hang_and_json_errors(fuzz_server) -> None:
    base = fuzz_server.base_url
    before = _greedy(base)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    session = requests.Session()
    failures: list[str] = []
    sent: Counter = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= GENERATING | {"/tokenize", "/detokenize", "/v1/messages/count_tokens", "/health"}
    started = time.monotonic()
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            kind = "generating" if op.path in GENERATING else "other"
            examples = max(1, int(EXAMPLES[(kind, mode.value)] * SCALE))

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                case.body = _cheap(op.path, case.body)
                try:
                    response = case.call(base_url=base, session=session, timeout=REQUEST_TIMEOUT_S)
                except requests.Timeout:
                    failures.append(f"{op.label}: no answer in {REQUEST_TIMEOUT_S} s to {case.body!r:.300}")
                    return
                sent[op.label] += 1
                status, text = response.status_code, response.text
                if status >= 500:
                    problem = f"status {status}: {text[:300]}"
                elif status >= 400:
                    problem = _error_shape_problem(op.path, status, text)
                elif any(v.startswith("text/event-stream") for v in response.headers.get("content-type", [])):
                    problem = _stream_problem(text)
                else:
                    problem = None
                if problem is not None:
                    failures.append(f"{op.label} ({mode.value}): {problem}\n    request body: {case.body!r:.300}")

            try:
                run()
            except Unsatisfiable:
                pass  # no invalid request exists for a route without parameters (GET /health)
    elapsed = time.monotonic() - started
    total = sum(sent.values())
    print(f"\nschemathesis: {total} requests over {len(sent)} operations in {elapsed:.0f} s: {dict(sent)}")
    assert not failures, f"{len(failures)} of {total} requests failed:\n" + "\n".join(failures[:20])
    assert total >= 1000 * min(SCALE, 1)
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    assert _greedy(base) == before
