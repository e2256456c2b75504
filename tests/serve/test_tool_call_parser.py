"""Tool-call parser: hand-written model outputs, whole and streamed (cut at every boundary)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s1serve.serve.parsers import (
    ContentDelta, ToolCallAbort, ToolCallArgs, ToolCallEnd, ToolCallParser, ToolCallStart,
)

TOOLS = {"get_weather", "get_time", "search"}


def counter_ids():
    n = itertools.count()
    return lambda: f"call_{next(n):04d}"


def streamed(text: str, cuts: list[int], **kwargs):
    """Feed `text` cut at `cuts`; check the event protocol; return (content, [(name, arguments)], announced)."""
    parser = ToolCallParser(**{"tool_names": TOOLS, **kwargs})
    bounds = [0, *sorted(cuts), len(text)]
    events = []
    for a, b in zip(bounds, bounds[1:]):
        events += parser.feed(text[a:b])
    events += parser.flush()
    content, calls, open_calls, ended = [], {}, {}, []
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            content.append(event.text)
        elif isinstance(event, ToolCallStart):
            assert event.index not in calls and event.id.startswith("call_") and event.name in TOOLS
            calls[event.index] = [event.id, event.name, ""]
            open_calls[event.index] = True
        elif isinstance(event, ToolCallArgs):
            assert open_calls.get(event.index) and event.arguments
            calls[event.index][2] += event.arguments
        elif isinstance(event, ToolCallEnd):
            assert open_calls.pop(event.index)
            call_id, name, arguments = calls[event.index]
            assert (event.call.id, event.call.name, event.call.arguments) == (call_id, name, arguments)
            ended.append((name, arguments))
        else:
            assert isinstance(event, ToolCallAbort) and open_calls.pop(event.index)
    assert not open_calls
    assert sorted(calls) == list(range(len(calls)))  # indices 0, 1, 2, ... in order
    assert [(c.name, c.arguments) for c in parser.calls] == ended
    return "".join(content) or None, ended, len(calls)


def parsed(text: str, **kwargs):
    content, calls = ToolCallParser(**{"tool_names": TOOLS, **kwargs}).parse(text)
    return content, [(c.name, c.arguments) for c in calls]


def call(name: str, arguments: str, key: str = "arguments") -> str:
    return f'<tool_call>\n{{"name": "{name}", "{key}": {arguments}}}\n</tool_call>'


TWO_CALLS = (
    "Let me check both.\n"
    + call("get_weather", '{"city": "Paris", "unit": "celsius"}') + "\n"
    + call("get_time", '{"tz":"Europe/Paris","fmt" :  null}')
)


def test_answer_and_two_tool_calls():
    content, calls = parsed(TWO_CALLS)
    assert content == "Let me check both."
    assert calls == [
        ("get_weather", '{"city": "Paris", "unit": "celsius"}'),
        ("get_time", '{"tz": "Europe/Paris", "fmt": null}'),
    ]
    _, parser_calls = ToolCallParser(TOOLS).parse(TWO_CALLS)
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parser_calls)
    assert parser_calls[0].id != parser_calls[1].id


def test_tool_call_alone():
    arguments = '{"q": "rust borrow checker"}'
    assert parsed(call("search", arguments)) == (None, [("search", arguments)])


def test_whitespace_around_json_tolerated():
    text = '<tool_call>{"name":"search","arguments":{"q":1}}</tool_call>' \
           '<tool_call> \n\t{"name": "search", "arguments": {}}\r\n </tool_call>'
    assert parsed(text) == (None, [("search", '{"q": 1}'), ("search", "{}")])


def test_parameters_key_accepted_for_arguments():
    assert parsed(call("search", '{"q": "x"}', key="parameters")) == (None, [("search", '{"q": "x"}')])


def test_arguments_as_json_string():
    text = call("get_weather", json.dumps(json.dumps({"city": "Zürich", "days": [1, 2.50]})))
    assert parsed(text) == (None, [("get_weather", '{"city": "Zürich", "days": [1, 2.5]}')])


@pytest.mark.parametrize("arguments", ['"not json"', '"{\\"a\\": 1} trailing"', '"[1]"', "[1, 2]", "3", "true"])
def test_arguments_that_are_not_an_object_make_the_block_content(arguments):
    text = "x " + call("search", arguments)
    assert parsed(text) == (text, [])


def test_missing_or_null_arguments_mean_empty_object():
    assert parsed('<tool_call>{"name": "get_time"}</tool_call>') == (None, [("get_time", "{}")])
    assert parsed('<tool_call>{"arguments": null, "name": "get_time"}</tool_call>') == (None, [("get_time", "{}")])


def test_arguments_before_name_and_extra_keys():
    text = '<tool_call>{"id": [1, {"x": 2}], "arguments": {"q": "a"}, "type": "function", "name": "search"}</tool_call>'
    assert parsed(text) == (None, [("search", '{"q": "a"}')])


BROKEN = [
    '<tool_call>\n{"name": "search", "arguments": {"q": }}\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": {"q": "x"}\n</tool_call>',  # missing a brace
    "<tool_call>\n{'name': 'search'}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "search", "name": "search"}\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": {}, "parameters": {}}\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": {"x": NaN}}\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": {"x": 1e999}}\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": {"x": "\\ud800"}}\n</tool_call>',  # lone surrogate
    '<tool_call>\n{"name": "search", "arguments": {"x": 01}}\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": {}} extra\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": {}}{"name": "search"}\n</tool_call>',
    "<tool_call>\n[]\n</tool_call>",
    "<tool_call></tool_call>",
]


@pytest.mark.parametrize("block", BROKEN)
def test_broken_json_comes_back_verbatim_as_content(block):
    text = "Before.\n" + block + "\nAfter."
    assert parsed(text) == (text, [])
    assert streamed(text, list(range(1, len(text))))[:2] == (text, [])


def test_broken_block_does_not_hide_a_good_one():
    good = call("search", '{"q": 1}')
    text = BROKEN[0] + "\n" + good
    assert parsed(text) == (BROKEN[0], [("search", '{"q": 1}')])
    reopened = '<tool_call>{"name": "sea' + good  # a block cut short by a new <tool_call>
    assert parsed(reopened) == ('<tool_call>{"name": "sea', [("search", '{"q": 1}')])


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "search", "arguments": {"q": "unfinished',
    '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_',
    "<tool_call>",
    "Partial tag at the end <tool_ca",
])
def test_unterminated_block_is_content(text):
    assert parsed(text) == (text, [])
    content, calls, _ = streamed(text, list(range(1, len(text))))
    assert (content, calls) == (text, [])


def test_unterminated_block_after_a_call_streams_an_abort():
    text = call("search", '{"q": 1}') + "\n" + '<tool_call>\n{"name": "get_time", "arguments": {"tz": "U'
    assert parsed(text) == ('<tool_call>\n{"name": "get_time", "arguments": {"tz": "U', [("search", '{"q": 1}')])
    parser = ToolCallParser(TOOLS)
    events = parser.feed(text)
    assert [type(e) for e in events] == [ToolCallStart, ToolCallArgs, ToolCallEnd, ToolCallStart, ToolCallArgs]
    assert events[3].name == "get_time" and events[4].arguments == '{"tz": "U'
    tail = parser.flush()  # max_tokens hit inside the second call
    assert tail == [ToolCallAbort(1), ContentDelta('<tool_call>\n{"name": "get_time", "arguments": {"tz": "U')]


def test_unknown_tool_name_is_content_and_never_announced():
    text = "Hm.\n" + call("rm_rf", '{"path": "/"}') + "\n" + call("search", '{"q": 2}')
    assert parsed(text) == ("Hm.\n" + call("rm_rf", '{"path": "/"}'), [("search", '{"q": 2}')])
    _, _, announced = streamed(text, list(range(1, len(text))))
    assert announced == 1
    assert ToolCallParser(tool_names=None).parse(text)[1][0].name == "rm_rf"  # None: any name
    assert ToolCallParser(tool_names=set()).parse(text)[1] == []


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = "x\n" + call("get_weather", '{"city": "A"}') + "\n" + call("get_time", "{}") + "\n" + BROKEN[0]
    expected = ("x\n" + BROKEN[0], [("get_weather", '{"city": "A"}')])
    assert parsed(text, parallel_tool_calls=False) == expected
    content, calls, announced = streamed(text, list(range(1, len(text))), parallel_tool_calls=False)
    assert (content, calls, announced) == (*expected, 1)
    assert len(parsed(text)[1]) == 2


def test_text_around_calls_stays_content():
    text = "A\n" + call("search", "{}") + "\nB\n\n" + call("search", "{}") + "\n" + call("search", "{}") + "\n"
    assert parsed(text)[0] == "A\nB"
    assert parsed(call("search", "{}") + "\n\nDone.")[0] == "Done."
    assert parsed("No calls here.\n\n")[0] == "No calls here.\n\n"
    assert parsed("</tool_call> stray close")[0] == "</tool_call> stray close"


def test_tags_inside_json_strings_do_not_end_the_block():
    text = call("search", '{"q": "</tool_call><tool_call>{\\"a\\": 1}"}')
    assert parsed(text) == (None, [("search", '{"q": "</tool_call><tool_call>{\\"a\\": 1}"}')])


def test_unicode_escapes_and_control_characters():
    raw = '{"s": "h\\u00e9 \\ud83d\\ude00 日本 \\n\\t\\"\\\\\\/ \\u0001", "raw": "line1\nline2", "e": -0, "f": 1E2}'
    content, calls = parsed(call("search", raw))
    assert content is None
    expected = json.dumps(json.loads(raw, strict=False), ensure_ascii=False)
    assert calls == [("search", expected)]
    assert "😀" in expected and "\\n" in expected and "\\u0001" in expected


def test_streaming_announces_the_name_before_the_arguments_end():
    parser = ToolCallParser(TOOLS, id_factory=counter_ids())
    assert parser.feed("Sure.\n<tool_call>\n{\"name\": \"get_wea") == [ContentDelta("Sure.")]
    assert parser.feed('ther", "arguments": {"city": "Pa') == [
        ToolCallStart(0, "call_0000", "get_weather"), ToolCallArgs(0, '{"city": "Pa')]
    assert parser.feed('ris", "days": 1') == [ToolCallArgs(0, 'ris", "days": ')]  # a number waits for its end
    events = parser.feed("0}}\n</tool_call>")
    assert events[0] == ToolCallArgs(0, "10}")
    assert isinstance(events[1], ToolCallEnd) and events[1].call.arguments == '{"city": "Paris", "days": 10}'
    assert parser.flush() == []


STREAM_TEXTS = [
    TWO_CALLS,
    "Hi <tool_call>{\"name\":\"search\",\"parameters\":\"{\\\"q\\\":\\\"\\u00e9\\\"}\"}</tool_call>\nbye\n",
    BROKEN[1] + "\n" + call("get_time", '{"a":[1,{"b":null}]}'),
    "<tool_call><tool_call>{\"arguments\":{}, \"name\":\"get_time\"} </tool_call></tool_call>\n",
    "a\n<tool_cal\n<tool_call>{\"name\": \"nope\"}</tool_call>\n\n",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_every_cut_streams_like_the_whole_response(text):
    content, calls = parsed(text)
    for i in range(len(text) + 1):
        assert streamed(text, [i])[:2] == (content, calls), i
    assert streamed(text, list(range(1, len(text))))[:2] == (content, calls)


@pytest.mark.parametrize("text", STREAM_TEXTS[:2])
def test_every_double_cut_streams_like_the_whole_response(text):
    expected = parsed(text)
    for i in range(0, len(text) + 1, 2):
        for j in range(i, len(text) + 1, 3):
            assert streamed(text, [i, j])[:2] == expected, (i, j)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    arguments=st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=5),
    as_string=st.booleans(), ensure_ascii=st.booleans(), indent=st.sampled_from([None, 0, 2]),
    key=st.sampled_from(["arguments", "parameters"]), data=st.data(),
)
def test_streamed_arguments_equal_json_dumps_byte_for_byte(arguments, as_string, ensure_ascii, indent, key, data):
    encoded = json.dumps(arguments, ensure_ascii=ensure_ascii, indent=indent)
    if as_string:
        encoded = json.dumps(encoded, ensure_ascii=ensure_ascii)
    text = f'pre\n<tool_call>\n{{"name": "search", "{key}": {encoded}}}\n</tool_call>'
    expected = ("pre", [("search", json.dumps(arguments, ensure_ascii=False))])
    assert parsed(text) == expected
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert streamed(text, cuts)[:2] == expected


FRAGMENTS = st.sampled_from([
    "<tool_call>", "</tool_call>", "\n", " ", "{", "}", '"name"', ":", '"search"', ",", '"arguments"', '"q"',
    "1", "[", "]", '"', "\\", "x", "<", "</tool", "é",
])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(FRAGMENTS, max_size=30), parallel=st.booleans(), data=st.data())
def test_fuzz_never_raises_and_streams_like_whole(parts, parallel, data):
    text = "".join(parts)
    content, calls = parsed(text, parallel_tool_calls=parallel)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    assert streamed(text, cuts, parallel_tool_calls=parallel)[:2] == (content, calls)
    if not calls:
        assert content == (text or None)  # nothing extracted: the text comes back unchanged
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)
