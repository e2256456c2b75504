"""Requests that used to answer a plain-text 500 (and break the keep-alive connection) or stop the engine for
everyone: each is now a JSON 400 naming the field, or served, and the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

GOLDEN = json.loads((Path(__file__).parents[1] / "fixtures/model/golden_tiny_seed0.json").read_text())
LONE = "\ud800"  # json.dumps writes it as the escape "\ud800", as a client with a broken string would


def _tool(name: str, description: str = "look something up") -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {"type": "object", "properties": {}}}}


def _chat(**fields) -> dict:
    return {"model": "intern-s1-pro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": "x' + LONE + '"}'}}
BAD = {
    "surrogate in message content": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "a" + LONE}]), "messages[0].content"),
    "surrogate in a tool description": ("/v1/chat/completions", _chat(tools=[_tool("f", "d" + LONE)]), "tools[0].function.description"),
    "surrogate in earlier tool-call arguments": (
        "/v1/chat/completions",
        _chat(messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "x"},
        ]),
        "messages[1].tool_calls[0].function.arguments",
    ),
    "surrogate in the model name": ("/v1/chat/completions", _chat(model="m" + LONE), "model"),
    "surrogate in a completions prompt": ("/v1/completions", {"model": "intern-s1-pro", "prompt": "a" + LONE, "max_tokens": 2}, "prompt"),
    "surrogate in a tokenize prompt": ("/tokenize", {"prompt": "a" + LONE}, "prompt"),
    "duplicate tool names, tool_choice required": ("/v1/chat/completions", _chat(tools=[_tool("f"), _tool("f")], tool_choice="required"), "tools"),
    "duplicate tool names, tool_choice named": (
        "/v1/chat/completions",
        _chat(tools=[_tool("f"), _tool("f")], tool_choice={"type": "function", "function": {"name": "f"}}),
        "tools",
    ),
    "tokenize with chat_template_kwargs.messages": (
        "/tokenize",
        {"messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": {"messages": []}},
        "messages",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_a_json_400_naming_the_field_and_the_connection_stays_usable(api_server, case: str) -> None:
    path, body, field = BAD[case]
    with httpx.Client(base_url=api_server.base_url, headers=api_server.headers, timeout=60) as http:
        r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and error["type"] == "invalid_request_error"
        assert field.split("[")[0].split(".")[0] in error["message"] or "declared twice" in error["message"]
        # The same keep-alive connection serves the next request.
        ok = http.post("/v1/completions", json={"model": "intern-s1-pro", "prompt": "hello", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_json_object_with_ignore_eos_ends_at_the_end_of_the_json_and_the_engine_goes_on(api_server) -> None:
    with httpx.Client(base_url=api_server.base_url, headers=api_server.headers, timeout=120) as http:
        r = http.post("/v1/chat/completions", json=_chat(
            response_format={"type": "json_object"}, ignore_eos=True, max_tokens=64,
            chat_template_kwargs={"enable_thinking": False},
        ))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "stop":  # the JSON closed within the budget: it is whole
            json.loads(choice["message"]["content"])
        assert httpx.get(f"{api_server.base_url}/health").status_code == 200
        again = http.post("/v1/completions", json={"model": "intern-s1-pro", "prompt": "hello", "max_tokens": 2})
        assert again.status_code == 200, again.text


def test_padding_ids_in_logprobs_decode_as_empty_text(api_server) -> None:
    """The lm_head has 155008 rows for 154766 tokens; the golden `text_short` prompt's 9th greedy id is 154929, a
    padding row, so it is both sampled and among the top candidates: it must come back as '' and never a 500."""
    prompt = next(p for p in GOLDEN["prompts"] if p["name"] == "text_short")
    padding_steps = [i for i, t in enumerate(prompt["greedy_ids"]) if t >= 154766]
    assert padding_steps, "the golden prompt no longer samples a padding id; pick another"
    with httpx.Client(base_url=api_server.base_url, headers=api_server.headers, timeout=120) as http:
        r = http.post("/v1/completions", json={
            "model": "intern-s1-pro", "prompt": prompt["prompt_ids"], "max_tokens": len(prompt["greedy_ids"]),
            "temperature": 0, "logprobs": 5, "ignore_eos": True,
        })
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    for step in padding_steps:
        assert logprobs["tokens"][step] == ""
        assert "" in logprobs["top_logprobs"][step]
