"""Our own corpus of malformed requests, each with the status and the words its error must carry.

With the 9 requests of test_bad_requests.py (lone surrogates, duplicate tools, /tokenize with
chat_template_kwargs.messages) this makes the corpus: invalid JSON and UTF-8, wrong types and out-of-range values of
every main field, deeply nested JSON, bodies over the limit, unknown fields, bad tools and schemas, bad
response_format, wrong content type, empty body, wrong method. Each answer is JSON in the route's error shape
(Anthropic's on /v1/messages), and the keep-alive connection serves the next request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import pytest

from e2e.conftest import API_KEY

MAX_BODY_BYTES = 8 << 20  # the default --max-request-body-bytes


@dataclass
class Case:
    path: str
    body: bytes | dict | None
    status: int
    says: str  # a substring of the error message (of the body, for a 200)
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"


def chat(**fields) -> dict:
    return {"model": "intern-s1-pro", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"model": "intern-s1-pro", "prompt": "hi", "max_tokens": 2, **fields}


def message(**fields) -> dict:
    return {"model": "intern-s1-pro", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], **fields}


def tool(name: str = "f", parameters: object = None, **function) -> dict:
    params = {"type": "object", "properties": {}} if parameters is None else parameters
    return {"type": "function", "function": {"name": name, "parameters": params, **function}}


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def nested_dict(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"a": value}
    return value


CHAT, CMPL, MSG = "/v1/chat/completions", "/v1/completions", "/v1/messages"
RAW_CHAT = json.dumps(chat())
REQUIRED = {"tool_choice": "required"}
CASES: dict[str, Case] = {
    # Not JSON, or not the JSON we take
    "truncated JSON": Case(CHAT, b'{"messages": [', 400, "not valid JSON: Expecting value at line 1 column 15"),
    "trailing garbage": Case(CHAT, RAW_CHAT.encode() + b" }x", 400, "not valid JSON: Extra data"),
    "single-quoted JSON": Case(CHAT, b"{'messages': []}", 400, "not valid JSON: Expecting property name"),
    "NaN literal": Case(CHAT, RAW_CHAT[:-1].encode() + b', "temperature": NaN}', 400, "NaN is not a JSON number"),
    "Infinity literal": Case(CHAT, RAW_CHAT[:-1].encode() + b', "top_p": Infinity}', 400, "Infinity is not a JSON number"),
    "-Infinity literal": Case(CMPL, b'{"prompt": "hi", "presence_penalty": -Infinity}', 400, "-Infinity is not a JSON number"),
    "number beyond a double": Case(CHAT, RAW_CHAT[:-1].encode() + b', "temperature": 1e400}', 400, "1e400, which is beyond the range of a double"),
    "a bare string": Case(CHAT, b'"hello"', 400, "must be a JSON object, got a string"),
    "an array": Case(CMPL, b"[1, 2]", 400, "must be a JSON object, got an array"),
    "null": Case(CHAT, b"null", 400, "must be a JSON object, got null"),
    "empty body": Case(CHAT, b"", 400, "request body is empty"),
    "whitespace body": Case(CMPL, b"  \n ", 400, "request body is empty"),
    "invalid UTF-8 byte": Case(CHAT, b'{"messages": [{"role": "user", "content": "\xff"}]}', 400, "not valid UTF-8: byte 0xff at offset 43"),
    "truncated UTF-8 sequence": Case(CMPL, b'{"prompt": "\xe2\x82"}', 400, "not valid UTF-8: byte 0xe2"),
    "UTF-16 body": Case(CHAT, RAW_CHAT.encode("utf-16"), 400, "not valid UTF-8"),
    "lone surrogate in a Responses input": Case("/v1/responses", b'{"input": "a\\ud800"}', 400, "input: holds an unpaired UTF-16 surrogate"),
    "lone surrogate in a key": Case(CHAT, b'{"messages": [{"role": "user", "content": "hi", "\\udc00": 1}]}', 400, "messages[0]: a key holds an unpaired UTF-16 surrogate escape"),
    "lone surrogate on /v1/messages": Case(MSG, json.dumps(message(messages=[{"role": "user", "content": "a\ud800"}])).encode(), 400, "messages[0].content: holds an unpaired"),
    "invalid JSON on /v1/messages": Case(MSG, b'{"max_tokens": 2,', 400, "not valid JSON"),
    # Content type and method
    "text/plain body": Case(CHAT, RAW_CHAT.encode(), 415, "Content-Type 'text/plain' is not supported", {"content-type": "text/plain"}),
    "form-encoded body": Case(CMPL, b"prompt=hi", 415, "application/x-www-form-urlencoded", {"content-type": "application/x-www-form-urlencoded"}),
    "GET on a POST route": Case(CHAT, None, 405, "method GET is not allowed on /v1/chat/completions; use POST", method="GET"),
    "GET on /v1/messages": Case(MSG, None, 405, "method GET is not allowed on /v1/messages", method="GET"),
    "unknown route": Case("/v1/nope", chat(), 404, "no route /v1/nope"),
    # Wrong types and out-of-range values
    "messages not a list": Case(CHAT, chat(messages="hi"), 400, "messages: Input should be a valid list"),
    "messages empty": Case(CHAT, chat(messages=[]), 400, "messages: List should have at least 1 item"),
    "unknown role": Case(CHAT, chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role: Input should be"),
    "content a number": Case(CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    "content part of unknown type": Case(CHAT, chat(messages=[{"role": "user", "content": [{"type": "bogus"}]}]), 400, "unknown type 'bogus'"),
    "temperature a string": Case(CHAT, chat(temperature="hot"), 400, "temperature: Input should be a valid number"),
    "temperature above 2": Case(CHAT, chat(temperature=3), 400, "temperature: Input should be less than or equal to 2"),
    "max_tokens a float": Case(CHAT, chat(max_tokens=2.5), 400, "max_tokens: Input should be a valid integer"),
    "max_tokens negative": Case(CMPL, completion(max_tokens=-1), 400, "max_tokens: Input should be greater than or equal to 1"),
    "max_tokens huge": Case(CHAT, chat(max_tokens=10**30), 400, "maximum context length is 2048"),
    "max_tokens a word": Case(CMPL, completion(max_tokens="ten"), 400, "max_tokens: Input should be a valid integer"),
    "n zero": Case(CHAT, chat(n=0), 400, "n: Input should be greater than or equal to 1"),
    "n huge": Case(CMPL, completion(n=100000), 400, "n: Input should be less than or equal to 128"),
    "stop a dict": Case(CHAT, chat(stop={"a": 1}), 400, "stop"),
    "stop an empty string": Case(CMPL, completion(stop=[""]), 400, "stop cannot contain an empty string"),
    "top_logprobs above 20": Case(CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs: Input should be less than or equal to 20"),
    "completion logprobs above 20": Case(CMPL, completion(logprobs=21), 400, "logprobs: Input should be less than or equal to 20"),
    "completion logprobs negative": Case(CMPL, completion(logprobs=-1), 400, "logprobs: Input should be greater than or equal to 0"),
    "seed beyond 64 bits": Case(CHAT, chat(seed=2**64), 400, "seed: Input should be less than or equal to 9223372036854775807"),
    "seed below 64 bits": Case(CMPL, completion(seed=-(2**63) - 1), 400, "seed: Input should be greater than or equal to -9223372036854775808"),
    "top_p above 1": Case(CHAT, chat(top_p=1.5), 400, "top_p: Input should be less than or equal to 1"),
    "top_p zero": Case(CMPL, completion(top_p=0), 400, "top_p: Input should be greater than 0"),
    "top_k below -1": Case(CHAT, chat(top_k=-2), 400, "top_k: Input should be greater than or equal to -1"),
    "presence_penalty above 2": Case(CHAT, chat(presence_penalty=3), 400, "presence_penalty: Input should be less than or equal to 2"),
    "frequency_penalty below -2": Case(CMPL, completion(frequency_penalty=-2.5), 400, "frequency_penalty: Input should be greater than or equal to -2"),
    "logit_bias key not a token id": Case(CHAT, chat(logit_bias={"x": 1}), 400, "logit_bias keys must be token ids, got 'x'"),
    "logit_bias value out of range": Case(CHAT, chat(logit_bias={"1": 1000}), 400, "logit_bias values must be in [-100, 100]"),
    "logit_bias key outside the vocabulary": Case(CMPL, completion(logit_bias={"999999": 1}), 400, "logit_bias token id 999999 is outside the vocabulary"),
    "logit_bias value a string": Case(CHAT, chat(logit_bias={"1": "up"}), 400, "logit_bias.1: Input should be a valid number"),
    "stream a word": Case(CHAT, chat(stream="maybe"), 400, "stream: Input should be a valid boolean"),
    "prompt empty list": Case(CMPL, completion(prompt=[]), 400, "prompt must be a non-empty string"),
    "prompt token id negative": Case(CMPL, completion(prompt=[-1]), 400, "prompt token id -1 is outside the vocabulary"),
    "prompt an object": Case(CMPL, completion(prompt={"a": 1}), 400, "prompt"),
    "detokenize tokens a string": Case("/detokenize", {"tokens": "abc"}, 400, "tokens: Input should be a valid list"),
    "tokenize prompt and messages": Case("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, "give exactly one of prompt or messages"),
    # Deeply nested JSON
    "10k nested lists in a tool schema": Case(
        CHAT, ('{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", '
               '"parameters": {"type": "object", "properties": {"a": ' + nested(10_000) + '}}}}]}').encode(),
        400, "nested deeper than 64 levels"),
    "100 nested objects in message content": Case(
        CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "meta": nested_dict(100)}]}]),
        400, "messages[0].content[0].meta.a.a"),
    "10k nested lists on /v1/messages": Case(MSG, ('{"max_tokens": 2, "messages": ' + nested(10_000) + "}").encode(), 400, "nested deeper than 64 levels"),
    # Bodies over the limit
    "body over the limit": Case(CHAT, chat(messages=[{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1)}]), 413, "larger than --max-request-body-bytes"),
    "body over the limit on /v1/messages": Case(MSG, message(system="x" * (MAX_BODY_BYTES + 1)), 413, "larger than --max-request-body-bytes"),
    # Unknown fields: ignored, as OpenAI and vLLM do; the Messages API refuses server-side features it lacks
    "unknown field on chat": Case(CHAT, chat(frobnicate=True), 200, '"object":"chat.completion"'),
    "unknown field on completions": Case(CMPL, completion(best_of_three=1), 200, '"object":"text_completion"'),
    "Messages container": Case(MSG, message(container="c1"), 400, "container is not supported"),
    # Bad tools
    "tool without a function name": Case(CHAT, chat(tools=[{"type": "function", "function": {"parameters": {}}}]), 400, "tools.0.function.name: Field required"),
    "tool name with spaces": Case(CHAT, chat(tools=[tool("look up")]), 400, "tools.0.function.name: String should match pattern"),
    "tool parameters of type array": Case(CHAT, chat(tools=[tool(parameters={"type": "array"})]), 400, "function parameters must be a JSON Schema of type 'object'"),
    "tool parameters a string": Case(CHAT, chat(tools=[tool(parameters="{}")]), 400, "tools.0.function.parameters: Input should be a valid dictionary"),
    "tool parameters with an unknown type": Case(
        CHAT, chat(tools=[tool(parameters={"type": "object", "properties": {"a": {"type": "nonsense"}}})], **REQUIRED), 400, "Invalid type: nonsense"),
    "tool parameters with a dangling $ref": Case(
        CHAT, chat(tools=[tool(parameters={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})], **REQUIRED), 400, "'/nowhere' does not exist"),
    "tool_choice naming a missing tool": Case(
        CHAT, chat(tools=[tool("f")], tool_choice={"type": "function", "function": {"name": "g"}}), 400, "tool_choice names function 'g'"),
    "tool_choice required without tools": Case(CHAT, chat(**REQUIRED), 400, "tool_choice 'required' needs at least one tool"),
    "tool_choice an unknown word": Case(CHAT, chat(tools=[tool()], tool_choice="sometimes"), 400, "tool_choice"),
    "tools not a list": Case(CHAT, chat(tools={"type": "function"}), 400, "tools: Input should be a valid list"),
    "tool of another type": Case(CHAT, chat(tools=[{"type": "retrieval", "function": {"name": "f"}}]), 400, "tools.0.type: Input should be 'function'"),
    "Messages tool without input_schema": Case(MSG, message(tools=[{"name": "f"}]), 400, "tools[0] needs a name (string) and an input_schema (object)"),
    # Bad response_format and schemas
    "response_format of unknown type": Case(CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type: Input should be 'text', 'json_object' or 'json_schema'"),
    "response_format a string": Case(CHAT, chat(response_format="json"), 400, "response_format: Input should be a valid dictionary"),
    "json_schema without a schema": Case(CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400, "needs json_schema.schema"),
    "json_schema with a bad regex": Case(
        CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}}), 400, "regex parse error"),
    "json_schema with a negative maxLength": Case(
        CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "string", "maxLength": -3}}}}}), 400, "Expected positive integer for 'maxLength', got -3"),
    "json_schema with $defs a list": Case(
        CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "$defs": []}}}), 400, "$defs must be an object"),
    "Responses json_schema without a schema": Case("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema"}}}, 400, "text.format json_schema needs a schema"),
    # Messages API fields
    "Messages without max_tokens": Case(MSG, {"messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens: Field required"),
    "Messages unknown role": Case(MSG, message(messages=[{"role": "robot", "content": "hi"}]), 400, "role must be 'user', 'assistant' or 'system'"),
    "Messages thinking budget over max_tokens": Case(MSG, message(thinking={"type": "enabled", "budget_tokens": 8}), 400, "must be less than max_tokens"),
}


def _message(case: Case, response: httpx.Response) -> str:
    body = response.json()
    if case.path.startswith(MSG):
        assert body["type"] == "error" and isinstance(body["error"]["type"], str), body
        return body["error"]["message"]
    error = body["error"]
    assert error["code"] == case.status and isinstance(error["type"], str) and "param" in error, body
    return error["message"]


def test_the_corpus_has_at_least_60_cases_with_test_bad_requests() -> None:
    from e2e.test_bad_requests import BAD

    assert len(CASES) + len(BAD) >= 60
    assert not set(CASES) & set(BAD)


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_request_gets_its_status_and_a_message_naming_the_problem(api_server, name: str) -> None:
    case = CASES[name]
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json", **case.headers}
    content = json.dumps(case.body).encode() if isinstance(case.body, dict) else case.body
    with httpx.Client(base_url=api_server.base_url, headers=headers, timeout=120) as http:
        r = http.request(case.method, case.path, content=content)
        assert r.status_code == case.status, r.text[:500]
        if case.status == 200:
            assert case.says in r.text
        else:
            assert case.says in _message(case, r), r.text[:500]
        # The same keep-alive connection serves the next request.
        assert http.get("/v1/models").status_code == 200
