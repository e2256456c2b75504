"""Chat Completions as a new user meets it: the SDK's default requests (no extra_body unless the feature itself
is an extension), against a real server. Issue 15's list of gaps: spacing around added tokens, reasoning_content
always present, tokenize/detokenize round trip, logit_bias, cached_tokens, echo, return_token_ids (prompt_logprobs:
test_prompt_logprobs.py)."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from openai import BadRequestError

from weather_tools import WEATHER_TOOLS

MODEL = "intern-s1-pro"
BLOCK_SIZE = 16  # the api_server fixture's --block-size


def _post(api_server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{api_server.base_url}{path}", json=body, headers=api_server.headers, timeout=120)


def test_tool_call_content_is_null_with_default_spacing(client):
    for seed in range(3):
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=200, seed=seed,
            tools=WEATHER_TOOLS, tool_choice="required",
        )
        message = response.choices[0].message
        assert response.choices[0].finish_reason == "tool_calls" and message.tool_calls
        assert message.content is None, repr(message.content)
        assert message.reasoning_content is None or not message.reasoning_content.endswith(" ")


def test_json_answer_in_thinking_mode_has_no_stray_whitespace(client):
    for seed in range(3):
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=120, seed=seed,
            response_format={"type": "json_object"},
        )
        message = response.choices[0].message
        assert message.reasoning_content is not None  # the thinking ran (and the grammar closed it)
        assert message.content == message.content.strip(), repr(message.content)
        assert isinstance(json.loads(message.content), dict)
        assert not message.reasoning_content.endswith(" "), repr(message.reasoning_content[-8:])


def test_reasoning_content_is_present_as_null_without_reasoning(api_server, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "chat_template_kwargs": {"enable_thinking": False}}
    message = _post(api_server, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert "reasoning_content" in message and message["reasoning_content"] is None
    sdk = client.chat.completions.create(
        model=MODEL, messages=body["messages"], max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert sdk.choices[0].message.reasoning_content is None  # an attribute the SDK can read, not an AttributeError


def test_detokenize_round_trips_with_defaults(api_server):
    ids = [9707, 1879, 220, 151667]
    text = _post(api_server, "/detokenize", {"tokens": ids}).json()["prompt"]
    assert text == "Hello world <think>"
    assert _post(api_server, "/tokenize", {"prompt": text}).json()["tokens"] == ids


def test_logit_bias_forces_and_forbids_tokens(client):
    prompt = [1, 2, 3, 4, 5]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"return_token_ids": True})
    first = plain.choices[0].token_ids[0]
    forbidden = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                          logit_bias={str(first): -100}, extra_body={"return_token_ids": True})
    assert first not in forbidden.choices[0].token_ids
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.9, seed=3,
                                       logit_bias={"9707": 100}, extra_body={"return_token_ids": True})
    assert forced.choices[0].token_ids == [9707] * 4
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, logit_bias={"9707": 100})
    assert chat.choices[0].message.reasoning_content == "Hello" * 3


@pytest.mark.parametrize("bias, needle", [({"x": 1}, "token ids"), ({"999999999": 1}, "outside the vocabulary"),
                                          ({"5": 101}, "[-100, 100]")])
def test_bad_logit_bias_is_a_400(client, bias, needle):
    with pytest.raises(BadRequestError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, logit_bias=bias)


def test_cached_tokens_count_the_prefix_cache_hits_of_a_repeated_prompt(client, anthropic_client):
    messages = [{"role": "user", "content": f"A unique question {uuid.uuid4().hex}: what is the weather like?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    prompt = first.usage.prompt_tokens
    assert prompt > 2 * BLOCK_SIZE
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Every full block but the one holding the last prompt token (whose logits must be computed) is a hit.
    assert again.usage.prompt_tokens_details.cached_tokens == (prompt - 1) // BLOCK_SIZE * BLOCK_SIZE

    text = f"Another unique question {uuid.uuid4().hex}, long enough to fill a couple of blocks of the cache."
    responses = [client.responses.create(model=MODEL, input=text, max_output_tokens=2) for _ in range(2)]
    assert responses[0].usage.input_tokens_details.cached_tokens == 0
    assert responses[1].usage.input_tokens_details.cached_tokens == (responses[1].usage.input_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE

    text = f"A third unique question {uuid.uuid4().hex}, long enough to fill a couple of blocks of the cache."
    msgs = [anthropic_client.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": text}])
            for _ in range(2)]
    assert msgs[0].usage.cache_read_input_tokens == 0
    whole = msgs[1].usage.input_tokens + msgs[1].usage.cache_read_input_tokens
    assert whole == msgs[0].usage.input_tokens
    assert msgs[1].usage.cache_read_input_tokens == (whole - 1) // BLOCK_SIZE * BLOCK_SIZE


def test_completions_echo_and_token_ids(client):
    prompt = "Echo this prompt back"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                    extra_body={"return_token_ids": True})
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    choice = out.choices[0]
    assert choice.text == prompt + plain.choices[0].text
    assert len(choice.token_ids) == out.usage.completion_tokens == 3
    assert len(choice.prompt_token_ids) == out.usage.prompt_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed == choice.text


def test_chat_return_token_ids(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                         extra_body={"return_token_ids": True})
    assert len(out.choices[0].token_ids) == out.usage.completion_tokens
    assert len(out.prompt_token_ids) == out.usage.prompt_tokens
    ids: list[int] = []
    prompt_ids = None
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                                stream=True, extra_body={"return_token_ids": True}):
        prompt_ids = getattr(chunk, "prompt_token_ids", None) or prompt_ids
        for c in chunk.choices:
            ids += getattr(c, "token_ids", None) or []
    assert len(ids) == 3 and prompt_ids == out.prompt_token_ids


@pytest.mark.parametrize("route, body, needle", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "Hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_unsupported_extensions_and_values_are_refused_not_ignored(api_server, route, body, needle):
    response = _post(api_server, route, {"model": MODEL, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]
