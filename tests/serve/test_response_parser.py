"""Both parsers on one response (what the server calls), and the CLI name registry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s1serve.serve.parsers import (
    REASONING_PARSER_NAMES, TOOL_CALL_PARSER_NAMES, ParserNameError, ReasoningParser, ResponseParser,
    ToolCallParser, get_reasoning_parser, get_tool_call_parser,
)

TOOLS = ["get_weather", "get_time"]


def make(starts_in_reasoning: bool | None = True, tools: list[str] | None = TOOLS, parallel: bool = True):
    reasoning = None if starts_in_reasoning is None else ReasoningParser(starts_in_reasoning)
    tool_parser = None if tools is None else ToolCallParser(tools, parallel_tool_calls=parallel)
    return ResponseParser(reasoning, tool_parser)


def stream(text: str, cuts: list[int], engine_reason: str = "stop", **kwargs):
    parser = make(**kwargs)
    bounds = [0, *sorted(cuts), len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [parser.flush()]
    reasoning = "".join(d.reasoning_content for d in deltas) or None
    content = "".join(d.content for d in deltas) or None
    calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
    for delta in deltas:
        for tc in delta.tool_calls:
            if tc.index not in calls:
                assert tc.id is not None and tc.name is not None  # id and name come first, once
                calls[tc.index] = [tc.id, tc.name, ""]
            else:
                assert tc.id is None and tc.name is None
            calls[tc.index][2] += tc.arguments
    # A call announced and then cut off (its text came back as content) is not among parser.tool_calls.
    finished = {c.id: (c.name, c.arguments) for c in parser.tool_calls}
    done = [(name, arguments) for call_id, name, arguments in calls.values() if call_id in finished]
    assert done == list(finished.values())
    return reasoning, content, done, parser.finish_reason(engine_reason)


def whole(text: str, engine_reason: str = "stop", **kwargs):
    out = make(**kwargs).parse(text, engine_reason)
    return out.reasoning_content, out.content, [(c.name, c.arguments) for c in out.tool_calls], out.finish_reason


FULL = (
    "\nThe user asks for weather and time in Paris.\n</think>\n\nChecking both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>'
)
WEATHER, TIME = ("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "CET"}')


def test_reasoning_answer_and_two_calls():
    assert whole(FULL) == ("The user asks for weather and time in Paris.", "Checking both.", [WEATHER, TIME],
                           "tool_calls")


def test_call_inside_the_thinking_ends_it():
    text = "\nI need the weather.\n<tool_call>\n" \
        + '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert whole(text) == ("I need the weather.", None, [WEATHER], "tool_calls")


def test_tool_call_without_reasoning():
    text = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
    assert whole(text, starts_in_reasoning=False) == (None, None, [TIME], "tool_calls")
    assert whole(text, starts_in_reasoning=None) == (None, None, [TIME], "tool_calls")


def test_truncated_thinking_is_reasoning_with_null_content_both_ways():
    text = "\nStill thinking about <tool_"
    expected = ("Still thinking about <tool_", None, [], "length")
    assert whole(text, "length") == expected
    assert stream(text, list(range(1, len(text))), "length") == expected


def test_enable_thinking_false_is_all_content():
    text = "The answer is 4."
    assert whole(text, starts_in_reasoning=False) == (None, text, [], "stop")
    assert stream(text, [3, 7], starts_in_reasoning=False) == (None, text, [], "stop")


def test_without_tool_parser_tool_call_text_is_content():
    text = 'ok</think>\n\n<tool_call>{"name": "get_time"}</tool_call>'
    assert whole(text, tools=None) == ("ok", '<tool_call>{"name": "get_time"}</tool_call>', [], "stop")


def test_without_tool_parser_a_tool_call_tag_stays_in_the_reasoning():
    text = 'Maybe <tool_call>{"name": "get_time"}</tool_call>? No.</think>\n\nIt is noon.'
    expected = ('Maybe <tool_call>{"name": "get_time"}</tool_call>? No.', "It is noon.", [], "stop")
    assert whole(text, tools=None) == expected
    assert stream(text, list(range(1, len(text))), tools=None) == expected
    # with tools, the same output is a call that ended the thinking
    assert whole(text) == ("Maybe ", "? No.</think>\n\nIt is noon.", [("get_time", "{}")], "tool_calls")


def test_broken_call_after_reasoning_is_content_and_finish_reason_stays():
    text = 'r</think>\n\n<tool_call>{"name": "get_time", "arguments": {</tool_call>'
    assert whole(text) == ("r", '<tool_call>{"name": "get_time", "arguments": {</tool_call>', [], "stop")


def test_parallel_tool_calls_false():
    assert whole(FULL, parallel=False)[2] == [WEATHER]
    assert stream(FULL, list(range(1, len(FULL))), parallel=False)[2] == [WEATHER]


def test_call_cut_off_by_max_tokens_after_its_name_was_streamed():
    text = 'r</think>\n\n<tool_call>{"name": "get_time", "arguments": {"tz": "C'
    parser = make()
    first = parser.feed(text)
    assert [(tc.index, tc.name, tc.arguments) for tc in first.tool_calls] == [(0, "get_time", '{"tz": "C')]
    last = parser.flush()
    assert last.content == '<tool_call>{"name": "get_time", "arguments": {"tz": "C' and not last.tool_calls
    assert parser.tool_calls == [] and parser.finish_reason("length") == "length"
    assert whole(text, "length") == ("r", last.content, [], "length")


def test_finish_reason_length_is_kept_even_with_calls():
    assert whole(FULL, "length")[3] == "length"


@pytest.mark.parametrize("kwargs", [{}, {"parallel": False}, {"starts_in_reasoning": False}, {"tools": None},
                                    {"starts_in_reasoning": None}])
def test_every_cut_of_the_full_response_streams_like_whole(kwargs):
    expected = whole(FULL, **kwargs)
    for i in range(len(FULL) + 1):
        assert stream(FULL, [i], **kwargs) == expected, i
    assert stream(FULL, list(range(1, len(FULL))), **kwargs) == expected


PIECES = st.sampled_from([
    "</think>", "<think>", "\n", "\n\n", "Sure.", "<tool_call>", "</tool_call>", '{"name": "get_time"', ", ",
    '"arguments": {"a": [1, "é"]}', "}", "<", "</",
])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(PIECES, max_size=16), starts=st.sampled_from([True, False, None]), data=st.data())
def test_random_responses_stream_like_whole(parts, starts, data):
    text = "".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    assert stream(text, cuts, starts_in_reasoning=starts) == whole(text, starts_in_reasoning=starts)


def test_content_start_tells_where_stop_strings_may_match():
    parser = make(tools=None)
    text = "\nSTOP is not a stop in the reasoning\n</think>\n\nAnswer. STOP here"
    for ch in text[:len("\nSTOP is not a stop in the reasoning\n</think>\n\n")]:
        parser.feed(ch)
        assert parser.content_start is None
    parser.feed("A")
    start = parser.content_start
    assert text[start:].startswith("Answer.") and text.find("STOP", start) == text.rfind("STOP")
    assert make(starts_in_reasoning=False).content_start == 0
    assert make(starts_in_reasoning=None).content_start == 0


def test_registry_names():
    for name in ("intern-s1", "interns1", "deepseek_r1", "qwen3", "INTERN_S1", "deepseek-r1"):
        assert get_reasoning_parser(name) is ReasoningParser
    for name in ("qwen3", "hermes", "qwen", "qwen25", "interns1", "intern-s1", "Hermes"):
        assert get_tool_call_parser(name) is ToolCallParser
    assert {"intern-s1", "deepseek_r1", "qwen3"} <= set(REASONING_PARSER_NAMES)
    assert {"qwen3", "hermes", "qwen"} <= set(TOOL_CALL_PARSER_NAMES)


def test_registry_unknown_name_lists_allowed():
    with pytest.raises(ParserNameError, match="--reasoning-parser; choose one of: intern-s1, interns1, deepseek_r1"):
        get_reasoning_parser("glm45")
    with pytest.raises(ValueError, match="unknown tool-call parser 'mistral'.*hermes"):
        get_tool_call_parser("mistral")
