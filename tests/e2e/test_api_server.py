"""The OpenAI-compatible server end to end: a real server process, the real `openai` SDK and httpx."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from openai import AsyncOpenAI, AuthenticationError, BadRequestError, NotFoundError

from weather_tools import WEATHER_TOOLS

QUESTION = [{"role": "user", "content": "Today is 2024-11-14, What's the temperature in San Francisco now? How about tomorrow?"}]


def _check_call(name: str, arguments: str) -> dict:
    tool = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER_TOOLS}
    assert name in tool, name
    args = json.loads(arguments)
    assert isinstance(args, dict)
    schema = tool[name]
    assert set(schema["required"]) <= set(args), args
    for key, value in args.items():
        assert key in schema["properties"], key
        if "enum" in schema["properties"][key]:
            assert value in schema["properties"][key]["enum"]
        else:
            assert isinstance(value, str)
    return args


def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["intern-s1-pro"]


def test_guide_tool_calling_walkthrough(client):
    model = client.models.list().data[0].id
    messages = list(QUESTION)
    response = client.chat.completions.create(
        model=model, messages=messages, max_tokens=300, temperature=0.8, top_p=0.95, seed=1,
        extra_body=dict(spaces_between_special_tokens=False), tools=WEATHER_TOOLS, tool_choice="required",
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and all(c.id.startswith("call_") for c in calls)
    messages.append(choice.message)
    for call in calls:
        args = _check_call(call.function.name, call.function.arguments)
        messages.append(
            {"role": "tool", "name": call.function.name, "tool_call_id": call.id,
             "content": json.dumps({"temperature": 26.1, **args}, ensure_ascii=False)}
        )
    second = client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0.8, top_p=0.95,
        extra_body=dict(spaces_between_special_tokens=False), tools=WEATHER_TOOLS,
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > response.usage.prompt_tokens


def test_guide_tool_calling_streamed(client):
    stream = client.chat.completions.create(
        model="intern-s1-pro", messages=QUESTION, max_tokens=300, seed=2, stream=True,
        tools=WEATHER_TOOLS, tool_choice="required", stream_options={"include_usage": True},
    )
    calls: dict[int, dict] = {}
    finish, usage = None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id:
                    assert entry["id"] is None, "id is sent once, in the call's first delta"
                    entry["id"], entry["name"] = delta.id, delta.function.name
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls and usage is not None and usage.completion_tokens > 0
    for entry in calls.values():
        assert entry["id"].startswith("call_")
        _check_call(entry["name"], entry["arguments"])


def test_thinking_switch(api_server, client):
    rendered = _post(api_server, "/tokenize", json={"messages": QUESTION}).json()
    plain_text = {"tokens": rendered["tokens"], "skip_special_tokens": False, "spaces_between_special_tokens": False}
    prompt = _post(api_server, "/detokenize", json=plain_text).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n<think>")
    thinking = client.chat.completions.create(model="intern-s1-pro", messages=QUESTION, max_tokens=24, temperature=0)
    message = thinking.choices[0].message
    # A random model rarely closes </think> in 24 tokens: then it is all reasoning and content is null.
    reasoning = getattr(message, "reasoning_content", None)
    assert reasoning, "thinking mode puts the text before </think> into reasoning_content"
    details = thinking.usage.completion_tokens_details
    assert details is not None and 0 < details.reasoning_tokens <= thinking.usage.completion_tokens

    plain = client.chat.completions.create(
        model="intern-s1-pro", messages=QUESTION, max_tokens=24, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    message = plain.choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    assert message.content
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0


def test_completions_take_token_ids_and_strings(client):
    by_ids = client.completions.create(model="intern-s1-pro", prompt=[1, 2, 3, 4], max_tokens=5, temperature=0)
    by_text = client.completions.create(model="intern-s1-pro", prompt="Hello there", max_tokens=5, temperature=0)
    assert by_ids.usage.prompt_tokens == 4 and by_ids.usage.completion_tokens == 5
    assert by_text.choices[0].finish_reason == "length" and by_text.usage.completion_tokens == 5
    again = client.completions.create(model="intern-s1-pro", prompt=[1, 2, 3, 4], max_tokens=5, temperature=0)
    assert again.choices[0].text == by_ids.choices[0].text


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_concurrent_streams_and_dropped_client_frees_blocks(api_server):
    async def one(client: AsyncOpenAI, i: int) -> int:
        stream = await client.chat.completions.create(
            model="intern-s1-pro", messages=[{"role": "user", "content": f"Count to {i}"}],
            max_tokens=12, temperature=0.7, seed=i, stream=True,
        )
        pieces = 0
        async for chunk in stream:
            pieces += sum(1 for c in chunk.choices if c.finish_reason is not None)
        return pieces

    async def main() -> list[int]:
        client = AsyncOpenAI(base_url=api_server.v1, api_key=api_server.api_key, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert asyncio.run(main()) == [1] * 32

    url = f"{api_server.base_url}/v1/chat/completions"
    body = {"model": "intern-s1-pro", "messages": QUESTION, "max_tokens": 1500, "stream": True, "temperature": 0.9}
    with httpx.stream("POST", url, json=body, headers=api_server.headers, timeout=60) as response:
        chunks = (line for line in response.iter_lines() if '"reasoning_content"' in line)
        assert len([c for _, c in zip(range(3), chunks)]) == 3
        during = _metric(httpx.get(f"{api_server.base_url}/metrics", headers=api_server.headers).text, "s1serve_kv_cache_usage_ratio")
        assert during > 0
    for _ in range(100):
        text = httpx.get(f"{api_server.base_url}/metrics", headers=api_server.headers).text
        if _metric(text, "s1serve_kv_cache_usage_ratio") == 0 and _metric(text, "s1serve_num_requests_running") == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    else:
        pytest.fail("the dropped stream's KV blocks were not freed")


def _post(api_server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{api_server.base_url}{path}", headers={**api_server.headers, **kwargs.pop("headers", {})}, timeout=60, **kwargs)


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"messages": QUESTION, "temperature": -1}, 400, "temperature"),
        ({"messages": QUESTION, "top_p": 2}, 400, "top_p"),
        ({"messages": QUESTION, "n": 0}, 400, "n"),
        ({"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": "hello"}, 400, "messages"),
        ({"messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
        ({"messages": QUESTION, "model": "gpt-4"}, 404, "gpt-4"),
        ({"messages": [{"role": "user", "content": "x " * 3000}]}, 400, "maximum context length is 2048"),
        ({"messages": QUESTION, "max_tokens": 4000}, 400, "4000"),
        ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 400, "tools"),
        ({"messages": QUESTION, "tools": WEATHER_TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "nope"),
    ],
)
def test_bad_input_is_answered_and_server_stays_healthy(api_server, body, status, needle):
    response = _post(api_server, "/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["code"] == status and error["type"]
    assert httpx.get(f"{api_server.base_url}/health").status_code == 200


def test_malformed_json_big_body_and_auth(api_server, client):
    bad = _post(api_server, "/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    huge = _post(api_server, "/v1/chat/completions", content=b"x" * (10 << 20), headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]["message"]
    assert httpx.post(f"{api_server.base_url}/v1/chat/completions", json={"messages": QUESTION}).status_code == 401
    from openai import OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=api_server.v1, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="other", messages=QUESTION, max_tokens=2)
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="intern-s1-pro", messages=QUESTION, max_tokens=2, top_p=0)
    assert httpx.get(f"{api_server.base_url}/health").status_code == 200


def test_named_tool_choice_and_json_schema_are_enforced(client):
    named = client.chat.completions.create(
        model="intern-s1-pro", messages=QUESTION, max_tokens=200, seed=3, tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_temperature_date"}},
    )
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_temperature_date"]
    _check_call(calls[0].function.name, calls[0].function.arguments)

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]}
    answer = client.chat.completions.create(
        model="intern-s1-pro", messages=QUESTION, max_tokens=200, seed=4,
        response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    data = json.loads(answer.choices[0].message.content)
    assert set(data) == {"city", "days"} and isinstance(data["city"], str) and isinstance(data["days"], int)
