"""Chat, Responses and Messages rendered from the same parser deltas: for generated model outputs (reasoning,
text, tool calls with `</tool_call>` inside string arguments, empty arguments, nested JSON, unicode, several
calls) cut into pieces in every way hypothesis draws, the streamed events of each API add up to exactly the
response that API returns unstreamed, and all three agree with the parser's whole-text result.

Cuts fall at any character boundary; every token boundary is one, so this covers every way the engine can cut the
text into chunks of 1..n tokens. No model runs: parser + renderers only.
"""

from __future__ import annotations

import itertools
import json

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from s1serve.serve.anthropic.render import MessageRenderer, signature
from s1serve.serve.blocks import BlockBuilder
from s1serve.serve.openai.render import delta_json
from s1serve.serve.parsers import ReasoningParser, ResponseParser, ToolCallParser
from s1serve.serve.responses.protocol import ResponsesRequest
from s1serve.serve.responses.render import ResponseRenderer

TOOLS = ("get_weather", "get_time", "no_args")
TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


def counter(prefix: str = "call_"):
    n = itertools.count()
    return lambda *_: f"{prefix}{next(n):04d}"


def parser() -> ResponseParser:
    return ResponseParser(ReasoningParser(True), ToolCallParser(TOOLS, id_factory=counter()))


def deltas(text: str, cuts: list[int]) -> tuple[ResponseParser, list]:
    p = parser()
    bounds = [0, *sorted(set(cuts)), len(text)]
    out = [p.feed(text[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    return p, out + [p.flush()]


# ---- generated model outputs -------------------------------------------------------------------------------------

FREE_TEXT = st.lists(st.sampled_from(list("ab \n<>/{}\"\\:,é中🙂") + ["tool_call", "think"]), max_size=16).map("".join)
JSON_SCALARS = (
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6) | st.sampled_from(["</tool_call>", "<tool_call>", "</think>", "a</tool_call>b", "\n"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=8,
)


@st.composite
def tool_call(draw) -> str:
    name = draw(st.sampled_from(TOOLS))
    arguments = {} if name == "no_args" else draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=4))
    encoded = json.dumps(arguments, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    if draw(st.booleans()):
        encoded = json.dumps(encoded)  # arguments as a JSON string holding the object
    key = "" if name == "no_args" and draw(st.booleans()) else f', "arguments": {encoded}'
    return f'<tool_call>\n{{"name": "{name}"{key}}}\n</tool_call>'


@st.composite
def model_output(draw) -> str:
    free = [draw(FREE_TEXT) for _ in range(3)]
    assume(not any(tag in t for t in free for tag in TAGS))
    reasoning, answer, after = free
    calls = draw(st.lists(tool_call(), max_size=3))
    text = reasoning
    if draw(st.booleans()) or not calls:  # closed reasoning and an answer; otherwise the first call ends it
        text += "\n</think>\n\n" + answer
    text += "".join(("\n" if i or text else "") + c for i, c in enumerate(calls))
    if calls and draw(st.booleans()):
        text += "\n" + after
    return text


def cuts_for(data, text: str) -> list[int]:
    return data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=max(1, len(text))))


def expected(text: str):
    out = parser().parse(text)
    return out.reasoning_content, out.content, [(c.name, c.arguments) for c in out.tool_calls]


# ---- Chat Completions ----------------------------------------------------------------------------------------------


def chat_from_chunks(chunks: list[dict]):
    reasoning, content, calls = "", "", {}
    for chunk in chunks:
        reasoning += chunk.get("reasoning_content", "")
        content += chunk.get("content", "")
        for call in chunk.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": None, "arguments": ""})
            if "id" in call:
                assert entry["name"] is None and call["type"] == "function"
                entry["name"] = call["function"]["name"]
            entry["arguments"] += call["function"]["arguments"]
    return reasoning or None, content or None, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@settings(max_examples=150, deadline=None)
@given(text=model_output(), data=st.data())
def test_chat_stream_adds_up_to_the_message(text, data):
    _, stream = deltas(text, cuts_for(data, text))
    assert chat_from_chunks([delta_json(d) for d in stream]) == expected(text)


# ---- Responses -----------------------------------------------------------------------------------------------------

REQUEST = ResponsesRequest(input="q", tools=[{"type": "function", "name": n} for n in TOOLS])
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def responses_run(text: str, cuts: list[int]) -> tuple[list[dict], dict]:
    p, stream = deltas(text, cuts)
    builder, renderer = BlockBuilder(lambda: p.tool_calls), ResponseRenderer(REQUEST, "resp_1", "m", item_id=counter("item_"))
    events = renderer.start()
    for delta in stream:
        for event in builder.feed(delta):
            events += renderer.events(event, builder.blocks)
    for event in builder.finish():
        events += renderer.events(event, builder.blocks)
    final = renderer.final(builder.blocks, p.finish_reason("stop"), USAGE)
    return events + [renderer.end(final)], final


def responses_client(events: list[dict]) -> list[dict]:
    """The output a client rebuilds from the events, checking their order."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "response.completed"
    items: dict[int, dict] = {}
    open_index = None
    for e in events[2:-1]:
        kind = e["type"]
        if kind == "response.output_item.added":
            assert open_index is None and e["output_index"] == len(items)
            open_index, items[e["output_index"]] = e["output_index"], dict(e["item"], status="completed")
            continue
        assert e["output_index"] == open_index
        item = items[open_index]
        if kind == "response.content_part.added":
            assert item["content"] == [] and e["part"]["text"] == ""
            item["content"].append(dict(e["part"]))
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            item["content"][0]["text"] += e["delta"]
        elif kind == "response.function_call_arguments.delta":
            item["arguments"] += e["delta"]
        elif kind == "response.function_call_arguments.done":
            assert e["arguments"] == item["arguments"]
        elif kind in ("response.output_text.done", "response.reasoning_text.done"):
            assert e["text"] == item["content"][0]["text"]
        elif kind == "response.content_part.done":
            assert e["part"] == item["content"][0]
        else:
            assert kind == "response.output_item.done" and e["item"] == item
            open_index = None
    assert open_index is None
    return [items[i] for i in sorted(items)]




@settings(max_examples=150, deadline=None)
@given(text=model_output(), data=st.data())
def test_responses_stream_adds_up_to_the_response(text, data):
    events, streamed_final = responses_run(text, cuts_for(data, text))
    _, whole = responses_run(text, [])
    rebuilt = responses_client(events)
    assert rebuilt == whole["output"] == streamed_final["output"] == events[-1]["response"]["output"]
    reasoning, content, calls = expected(text)
    by_type = lambda t: [i for i in rebuilt if i["type"] == t]  # noqa: E731
    assert "".join(i["content"][0]["text"] for i in by_type("reasoning")) == (reasoning or "")
    assert len(by_type("reasoning")) == (reasoning is not None)
    assert "".join(i["content"][0]["text"] for i in by_type("message")) == (content or "")
    assert [(i["name"], i["arguments"]) for i in by_type("function_call")] == calls
    assert whole["status"] == "completed" and whole["usage"]["output_tokens"] == 7


# ---- Messages ------------------------------------------------------------------------------------------------------


def messages_run(text: str, cuts: list[int]) -> tuple[list[dict], dict]:
    p, stream = deltas(text, cuts)
    builder, renderer = BlockBuilder(lambda: p.tool_calls), MessageRenderer("msg_1", "m")
    events = renderer.start(5)
    for delta in stream:
        for event in builder.feed(delta):
            events += renderer.events(event, builder.blocks)
    for event in builder.finish():
        events += renderer.events(event, builder.blocks)
    final = renderer.final(builder.blocks, p.finish_reason("stop"), None, USAGE)
    return events + renderer.end(final), final


def messages_client(events: list[dict]) -> dict:
    """The message a client rebuilds from the events (as the anthropic SDK does), checking their order."""
    assert events[0]["type"] == "message_start" and events[0]["message"]["content"] == []
    assert [e["type"] for e in events[-2:]] == ["message_delta", "message_stop"]
    message = dict(events[0]["message"])
    content: list[dict] = []
    partial: dict[int, str] = {}
    open_index = None
    for e in events[1:-2]:
        kind = e["type"]
        if kind == "ping":
            continue
        if kind == "content_block_start":
            assert open_index is None and e["index"] == len(content)
            open_index = e["index"]
            content.append(dict(e["content_block"]))
            continue
        assert e["index"] == open_index
        block = content[open_index]
        if kind == "content_block_stop":
            if block["type"] == "tool_use":
                block["input"] = json.loads(partial.pop(open_index))
            open_index = None
            continue
        delta = e["delta"]
        if delta["type"] == "text_delta":
            block["text"] += delta["text"]
        elif delta["type"] == "thinking_delta":
            block["thinking"] += delta["thinking"]
        elif delta["type"] == "signature_delta":
            block["signature"] += delta["signature"]
        else:
            assert delta["type"] == "input_json_delta" and block["type"] == "tool_use"
            partial[open_index] = partial.get(open_index, "") + delta["partial_json"]
    assert open_index is None
    message.update(content=content, stop_reason=events[-2]["delta"]["stop_reason"],
                   stop_sequence=events[-2]["delta"]["stop_sequence"], usage=events[-2]["usage"])
    return message


@settings(max_examples=150, deadline=None)
@given(text=model_output(), data=st.data())
def test_messages_stream_adds_up_to_the_message(text, data):
    events, streamed_final = messages_run(text, cuts_for(data, text))
    _, whole = messages_run(text, [])
    assert messages_client(events) == whole == streamed_final
    reasoning, content, calls = expected(text)
    blocks = whole["content"]
    thinking = [b for b in blocks if b["type"] == "thinking"]
    assert [b["thinking"] for b in thinking] == ([reasoning] if reasoning else [])
    assert all(b["signature"] == signature(b["thinking"]) for b in thinking)
    assert "".join(b["text"] for b in blocks if b["type"] == "text") == (content or "")
    uses = [b for b in blocks if b["type"] == "tool_use"]
    assert [(b["name"], json.dumps(b["input"], ensure_ascii=False)) for b in uses] == calls
    assert whole["stop_reason"] == ("tool_use" if calls else "end_turn")


# ---- the cases the issue names, written out -----------------------------------------------------------------------

NAMED = [
    # a literal </tool_call> inside a string argument does not end the call
    '\nplan\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"q": "x</tool_call>y"}}\n</tool_call>',
    # a tool without parameters keeps {} (arguments absent, or an empty object)
    '<tool_call>\n{"name": "no_args"}\n</tool_call>\n<tool_call>\n{"name": "no_args", "arguments": {}}\n</tool_call>',
    # reasoning ended by the call itself, nested JSON and unicode
    'think 中\n<tool_call>\n{"name": "get_time", "arguments": {"a": [1, {"b": "🙂"}], "c": null}}\n</tool_call>',
]


def test_named_cases_at_every_single_cut():
    for text in NAMED:
        reasoning, content, calls = expected(text)
        assert calls and all(json.loads(a) is not None for _, a in calls)
        _, whole = messages_run(text, [])
        _, whole_responses = responses_run(text, [])
        for cut in range(1, len(text)):
            assert messages_client(messages_run(text, [cut])[0]) == whole
            assert responses_client(responses_run(text, [cut])[0]) == whole_responses["output"]
            _, stream = deltas(text, [cut])
            assert chat_from_chunks([delta_json(d) for d in stream]) == (reasoning, content, calls)
    assert expected(NAMED[0])[2] == [("get_weather", '{"q": "x</tool_call>y"}')]
    assert expected(NAMED[1])[2] == [("no_args", "{}"), ("no_args", "{}")]
