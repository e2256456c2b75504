"""The proxy's --max-request-body-bytes: a larger body, declared or chunked, is a JSON 413 naming the flag, and is
never forwarded; a body within it passes on."""

from __future__ import annotations

import json

import httpx

from proxy_procs import Processes


def test_a_body_over_the_limit_is_a_413_naming_the_flag() -> None:
    procs = Processes()
    try:
        proxy = procs.proxy(extra=("--max-request-body-bytes", "1000"))
        proxy.wait_ready()
        big = json.dumps({"model": "m", "prompt": "a" * 2000}).encode()
        declared = httpx.post(f"{proxy.url}/v1/completions", content=big, headers={"content-type": "application/json"})
        chunked = httpx.post(f"{proxy.url}/v1/completions", content=iter([big[:600], big[600:]]),
                             headers={"content-type": "application/json"})
        for r in (declared, chunked):
            assert r.status_code == 413, r.text
            error = r.json()["error"]
            assert error["message"] == "request body is larger than --max-request-body-bytes (1000 bytes)"
            assert error["code"] == 413
        small = httpx.post(f"{proxy.url}/v1/completions", json={"model": "m", "prompt": "a"})
        assert small.status_code != 413 and "error" in small.json()  # within the limit: routed (no node here)
    finally:
        procs.close()
