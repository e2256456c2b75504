"""The Responses and Messages APIs end to end: a real server on the tiny checkpoint, the real `openai` and
`anthropic` SDKs. tool_choice forces the calls so that the guide's weather loop really runs on random weights."""

from __future__ import annotations

import json

import httpx
import pytest
from anthropic import Anthropic, AuthenticationError as AnthropicAuthError, BadRequestError as AnthropicBadRequest
from openai import BadRequestError

from weather_tools import WEATHER_TOOLS

MODEL = "intern-s1-pro"
QUESTION = "Today is 2024-11-14, What's the temperature in San Francisco now? How about tomorrow?"
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER_TOOLS}
RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in WEATHER_TOOLS]
ANTHROPIC_TOOLS = [
    {"name": t["function"]["name"], "description": t["function"]["description"], "input_schema": t["function"]["parameters"]}
    for t in WEATHER_TOOLS
]


def check_arguments(name: str, args: dict) -> dict:
    """The call names a weather tool and its arguments match that tool's schema."""
    schema = SCHEMAS[name]
    assert isinstance(args, dict) and set(schema["required"]) <= set(args), args
    for key, value in args.items():
        prop = schema["properties"][key]
        assert value in prop["enum"] if "enum" in prop else isinstance(value, str), (key, value)
    return args


def tool_result(args: dict) -> str:
    return json.dumps({"temperature": 26.1, **args}, ensure_ascii=False)


# ---- Responses -----------------------------------------------------------------------------------------------------


def test_responses_weather_walkthrough(client):
    first = client.responses.create(
        model=MODEL, input=QUESTION, tools=RESPONSES_TOOLS, tool_choice="required", max_output_tokens=300,
        temperature=0.8, top_p=0.95,
    )
    assert first.status == "completed" and first.id.startswith("resp_")
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and first.usage.output_tokens > 0
    outputs = []
    for call in calls:
        assert call.call_id.startswith("call_") and call.status == "completed"
        args = check_arguments(call.name, json.loads(call.arguments))
        outputs.append({"type": "function_call_output", "call_id": call.call_id, "output": tool_result(args)})
    # The results go back with the whole conversation as items, and again through previous_response_id.
    replay = [{"role": "user", "content": QUESTION}] + [item.model_dump(exclude_none=True) for item in first.output]
    by_items = client.responses.create(model=MODEL, input=replay + outputs, tools=RESPONSES_TOOLS, max_output_tokens=16)
    by_id = client.responses.create(
        model=MODEL, previous_response_id=first.id, input=outputs, tools=RESPONSES_TOOLS, max_output_tokens=16
    )
    for final in (by_items, by_id):
        assert final.output and final.usage.input_tokens > first.usage.input_tokens
        assert final.status in ("completed", "incomplete")
    assert by_id.usage.input_tokens == by_items.usage.input_tokens  # the same conversation either way
    assert client.responses.retrieve(first.id).output[0].id == first.output[0].id


def test_responses_not_stored_cannot_be_continued(client):
    unstored = client.responses.create(model=MODEL, input="hi", max_output_tokens=4, store=False)
    with pytest.raises(BadRequestError, match="unknown or was evicted"):
        client.responses.create(model=MODEL, input="more", previous_response_id=unstored.id, max_output_tokens=4)


def test_responses_weather_walkthrough_streamed(client):
    stream = client.responses.create(
        model=MODEL, input=QUESTION, tools=RESPONSES_TOOLS, tool_choice="required", max_output_tokens=300, stream=True,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    arguments: dict[str, str] = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            arguments[e.item_id] = arguments.get(e.item_id, "") + e.delta
    final = events[-1].response
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls and final.usage.output_tokens > 0
    for call in calls:
        assert arguments[call.id] == call.arguments
        check_arguments(call.name, json.loads(call.arguments))
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": tool_result(json.loads(c.arguments))}
               for c in calls]
    answer = list(client.responses.create(model=MODEL, previous_response_id=final.id, input=outputs,
                                          max_output_tokens=16, stream=True))
    # Cut by max_output_tokens the stream ends in response.incomplete, as OpenAI's does (the SDK's
    # `responses.stream()` helper accepts only response.completed, so the raw stream is read here).
    assert answer[-1].type in ("response.completed", "response.incomplete")
    assert answer[-1].response.output and answer[-1].response.usage.output_tokens > 0


def test_responses_reasoning_items_and_effort(client):
    thinking = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0)
    kinds = [item.type for item in thinking.output]
    assert kinds[0] == "reasoning" and thinking.status == "incomplete"
    assert thinking.incomplete_details.reason == "max_output_tokens"
    assert 0 < thinking.usage.output_tokens_details.reasoning_tokens <= 12
    plain = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0,
                                    reasoning={"effort": "none"})
    assert [item.type for item in plain.output] == ["message"]
    assert plain.usage.output_tokens_details.reasoning_tokens == 0


def test_responses_json_schema_format(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
              "additionalProperties": False}
    response = client.responses.create(
        model=MODEL, input="Name a city as JSON.", max_output_tokens=120, reasoning={"effort": "none"},
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
    )
    value = json.loads(response.output_text)
    assert set(value) == {"city"} and isinstance(value["city"], str) and len(value["city"]) <= 8


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"input": [{"type": "web_search_call", "id": "x"}]}, "item type 'web_search_call' is not supported"),
        ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "1"}]}, "call_nope"),
        ({"input": "hi", "previous_response_id": "resp_unknown"}, "unknown or was evicted"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "only 'function' tools"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_responses_bad_input_is_a_400_in_openai_shape(api_server, body, needle):
    reply = httpx.post(f"{api_server.v1}/responses", json={"model": MODEL, **body}, headers=api_server.headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and needle in error["message"]


def test_responses_sdk_raises_bad_request_for_an_unknown_previous_id(client):
    with pytest.raises(BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_gone", max_output_tokens=4)


# ---- Messages ------------------------------------------------------------------------------------------------------


def test_messages_weather_walkthrough(anthropic_client):
    messages = [{"role": "user", "content": QUESTION}]
    first = anthropic_client.messages.create(
        model=MODEL, max_tokens=300, messages=messages, tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"},
        temperature=0.8, top_p=0.95,
    )
    assert first.stop_reason == "tool_use" and first.role == "assistant"
    uses = [block for block in first.content if block.type == "tool_use"]
    assert uses and first.usage.output_tokens > 0
    results = []
    for use in uses:
        args = check_arguments(use.name, use.input)
        results.append({"type": "tool_result", "tool_use_id": use.id, "content": tool_result(args)})
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": results}]
    final = anthropic_client.messages.create(model=MODEL, max_tokens=16, messages=messages, tools=ANTHROPIC_TOOLS)
    assert final.content and final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    prompt = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert prompt > first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert final.usage.cache_read_input_tokens > 0  # the second turn starts with the first turn's prompt
    counted = anthropic_client.messages.count_tokens(model=MODEL, messages=messages, tools=ANTHROPIC_TOOLS)
    assert counted.input_tokens == prompt


def test_messages_weather_walkthrough_streamed_with_thinking(anthropic_client):
    messages = [{"role": "user", "content": QUESTION}]
    with anthropic_client.messages.stream(
        model=MODEL, max_tokens=300, messages=messages, tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_current_temperature"},
        thinking={"type": "enabled", "budget_tokens": 24},
    ) as stream:
        kinds = [event.type for event in stream]
        first = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert first.stop_reason == "tool_use"
    thinking = [b for b in first.content if b.type == "thinking"]
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(thinking) == 1 and thinking[0].signature and first.content[0] is thinking[0]
    assert len(uses) == 1 and uses[0].name == "get_current_temperature"
    args = check_arguments(uses[0].name, uses[0].input)
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": tool_result(args)}]}]
    with anthropic_client.messages.stream(model=MODEL, max_tokens=16, messages=messages, tools=ANTHROPIC_TOOLS) as stream:
        final = stream.get_final_message()
    assert final.content and final.usage.output_tokens > 0


def test_messages_thinking_budget_ends_the_thinking(anthropic_client):
    """Without a budget a random model thinks until max_tokens; with one, the thinking ends and an answer follows."""
    ask = dict(model=MODEL, max_tokens=48, messages=[{"role": "user", "content": QUESTION}], temperature=0)
    unbounded = anthropic_client.messages.create(**ask, thinking={"type": "enabled", "budget_tokens": 47})
    budgeted = anthropic_client.messages.create(**ask, thinking={"type": "enabled", "budget_tokens": 6})
    assert [b.type for b in unbounded.content] == ["thinking"] and unbounded.stop_reason == "max_tokens"
    assert budgeted.content[0].type == "thinking" and len(budgeted.content) > 1
    plain = anthropic_client.messages.create(**ask)
    assert all(b.type != "thinking" for b in plain.content)


def test_messages_stop_sequences(anthropic_client):
    ask = dict(model=MODEL, max_tokens=24, messages=[{"role": "user", "content": "Say something."}], temperature=0)
    free = anthropic_client.messages.create(**ask)
    text = "".join(b.text for b in free.content if b.type == "text")
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    cut = anthropic_client.messages.create(**ask, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert "".join(b.text for b in cut.content if b.type == "text") == text[: text.index(stop)]


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}],
          "max_tokens": 8}, "tool_use_id 'toolu_x'"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
          "thinking": {"type": "enabled", "budget_tokens": 8}}, "budget_tokens (8) must be less than max_tokens (8)"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}], "max_tokens": 8},
         "block type 'document' is not supported"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "tools": [{"type": "bash_20250124", "name": "bash"}]},
         "only client tools"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "tool_choice": {"type": "tool", "name": "nope"},
          "tools": ANTHROPIC_TOOLS}, "nope"),
    ],
)
def test_messages_bad_input_is_a_400_in_anthropic_shape(api_server, body, needle):
    reply = httpx.post(f"{api_server.v1}/messages", json={"model": MODEL, **body}, headers={"x-api-key": api_server.api_key})
    assert reply.status_code == 400, reply.text
    error = reply.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
    assert needle in error["error"]["message"]


def test_messages_not_json_and_wrong_key(api_server):
    reply = httpx.post(f"{api_server.v1}/messages", content=b"{nope", headers={"x-api-key": api_server.api_key})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    for headers in ({"x-api-key": "wrong"}, {}):
        reply = httpx.post(f"{api_server.v1}/messages", json={}, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    bearer = httpx.post(f"{api_server.v1}/messages/count_tokens", headers={"Authorization": f"Bearer {api_server.api_key}"},
                        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert bearer.status_code == 200 and bearer.json()["input_tokens"] > 0


def test_messages_sdk_errors(api_server, anthropic_client):
    with pytest.raises(AnthropicBadRequest, match="budget_tokens"):
        anthropic_client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                                         thinking={"type": "enabled", "budget_tokens": 100})
    with pytest.raises(AnthropicAuthError):
        Anthropic(base_url=api_server.base_url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])


ODD_BODIES = [
    ("responses", {"input": [1, "x"]}),
    ("responses", {"input": [{"type": "message", "role": "tool", "content": "x"}]}),
    ("responses", {"input": [{"type": "message", "role": "user", "content": [None, 3]}]}),
    ("responses", {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{nope"}]}),
    ("responses", {"input": [{"type": "function_call_output", "call_id": "c", "output": None}]}),
    ("responses", {"input": "hi", "tool_choice": {"type": "function", "name": "nope"}, "tools": RESPONSES_TOOLS}),
    ("responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}),
    ("responses", {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}),
    ("messages", {"max_tokens": 4, "messages": [{"role": "tool", "content": "x"}]}),
    ("messages", {"max_tokens": 4, "messages": [{"role": "system", "content": [{"type": "image", "source": {}}]}]}),
    ("messages", {"max_tokens": 4, "messages": [{"role": "user", "content": None}]}),
    ("messages", {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]}),
    ("messages", {"max_tokens": 4, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": 1}]}]}),
    ("messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}]}),
    ("messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "enabled"}}),
    ("messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "tool"}}),
    ("messages", {"max_tokens": 4, "messages": []}),
    ("messages", [1, 2]),
    ("messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "mcp_servers": [{"url": "x"}]}),
    ("responses", {"input": "hi", "background": True}),
]


@pytest.mark.parametrize("route, body", ODD_BODIES)
def test_odd_bodies_are_400_never_500(api_server, route, body):
    if isinstance(body, dict):
        body = {"model": MODEL, **body}
    reply = httpx.post(f"{api_server.v1}/{route}", json=body, headers=api_server.headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()
    message = error["error"]["message"]
    assert message and (error.get("type") == "error") == (route == "messages")


def test_messages_system_message_between_turns_is_rendered(anthropic_client):
    """Claude Code sends `system` role messages inside `messages`; they reach the prompt as system turns."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with_system = turns + [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "and?"}]
    without = turns + [{"role": "user", "content": "and?"}]
    a = anthropic_client.messages.count_tokens(model=MODEL, messages=with_system).input_tokens
    b = anthropic_client.messages.count_tokens(model=MODEL, messages=without).input_tokens
    assert a > b
