"""Reasoning parser: whole-response rules, and streams cut anywhere giving the same split."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s1serve.serve.parsers import ReasoningParser, count_reasoning_tokens, prompt_opens_reasoning

TEMPLATE = Path(__file__).resolve().parents[2] / "s1serve" / "assets" / "chat_template.jinja"


def stream(text: str, cuts: list[int], starts_in_reasoning: bool = True, ends_at_tool_call: bool = True):
    """Feed `text` cut at `cuts`; return the joined (reasoning, content, content_start) as split() reports them."""
    parser = ReasoningParser(starts_in_reasoning, ends_at_tool_call)
    reasoning, content = [], []
    bounds = [0, *sorted(cuts), len(text)]
    for a, b in zip(bounds, bounds[1:]):
        r, c = parser.feed(text[a:b])
        reasoning.append(r)
        content.append(c)
        if parser.in_reasoning:
            assert parser.content_start is None
    r, c = parser.flush()
    reasoning.append(r)
    content.append(c)
    return "".join(reasoning) or None, "".join(content) or None, parser.content_start


def whole(text: str, starts_in_reasoning: bool = True, ends_at_tool_call: bool = True):
    split = ReasoningParser(starts_in_reasoning, ends_at_tool_call).split(text)
    return split.reasoning, split.content, split.content_start


CASES = [
    # (output text, starts_in_reasoning, reasoning, content)
    ("\nThe user wants a haiku.\nCount syllables", True, "The user wants a haiku.\nCount syllables", None),
    ("\nAdd 2 and 2.\n\nIt is 4.\n</think>\n\nThe answer is 4.", True, "Add 2 and 2.\n\nIt is 4.", "The answer is 4."),
    ("Short.</think>Answer\n\n", True, "Short.", "Answer\n\n"),
    ("<think>\nRe-opened.\n</think>\n\nA", True, "Re-opened.", "A"),
    ("</think>\n\nNo thoughts.", True, None, "No thoughts."),
    ("\n\n</think>\n\n", True, None, None),
    ("", True, None, None),
    ("Need the weather.\n<tool_call>\n{\"name\": \"w\"}\n</tool_call>", True,
     "Need the weather.", "<tool_call>\n{\"name\": \"w\"}\n</tool_call>"),
    ("R</think>A </think> B <think>C", True, "R", "A </think> B <think>C"),
    ("R <think> inner </think>A", True, "R <think> inner ", "A"),
    ("Plain answer, no thinking.", False, None, "Plain answer, no thinking."),
    ("<think>x</think>\n\nkept verbatim", False, None, "<think>x</think>\n\nkept verbatim"),
    ("", False, None, None),
]


@pytest.mark.parametrize(("text", "starts", "reasoning", "content"), CASES)
def test_whole_response(text, starts, reasoning, content):
    got_reasoning, got_content, start = whole(text, starts)
    assert (got_reasoning, got_content) == (reasoning, content)
    if content is not None:
        assert text[start:] == content  # content is the output verbatim from content_start on


def test_reasoning_only_is_all_reasoning_and_content_null_streamed_too():
    text = "\nThe user wants a haiku.\nCount syllables"  # max_tokens hit before </think>
    assert whole(text) == ("The user wants a haiku.\nCount syllables", None, None)
    assert stream(text, list(range(1, len(text)))) == whole(text)


def test_enable_thinking_false_streams_everything_as_content():
    parser = ReasoningParser(starts_in_reasoning=False)
    assert parser.content_start == 0 and not parser.in_reasoning
    assert parser.feed("</thi") == ("", "</thi")
    assert parser.feed("nk>x") == ("", "nk>x")
    assert parser.flush() == ("", "")


def test_stream_holds_back_only_possible_tag_starts():
    parser = ReasoningParser()
    assert parser.feed("Think") == ("Think", "")
    assert parser.feed(" hard</th") == (" hard", "")  # "</th" might be </think>
    assert parser.feed("ought>") == ("</thought>", "")  # it was not
    assert parser.feed("<") == ("", "")
    assert parser.feed("/think>\n") == ("", "")  # newlines after </think> are not content
    assert parser.in_reasoning is False and parser.content_start is None
    assert parser.feed("\nDone") == ("", "Done")
    assert parser.content_start == len("Think hard</thought></think>\n\n")
    assert parser.flush() == ("", "")


def test_trailing_newlines_of_reasoning_are_held_until_known_interior():
    parser = ReasoningParser()
    assert parser.feed("\nA\n") == ("A", "")
    assert parser.feed("\nB") == ("\n\nB", "")
    assert parser.feed("\n") == ("", "")
    assert parser.flush() == ("", "")  # truncated: trailing newlines dropped as in split()


def test_tool_call_ends_reasoning_and_goes_to_content():
    parser = ReasoningParser()
    assert parser.feed("Call it.\n<tool_") == ("Call it.", "")
    assert parser.feed("call>{") == ("", "<tool_call>{")
    assert parser.content_start == len("Call it.\n")


def test_without_tool_parsing_a_tool_call_tag_does_not_end_reasoning():
    text = "R <tool_call>{}</tool_call> more\n</think>\n\nA"
    assert whole(text, ends_at_tool_call=False) == ("R <tool_call>{}</tool_call> more", "A", len(text) - 1)
    for i in range(len(text) + 1):
        assert stream(text, [i], ends_at_tool_call=False) == whole(text, ends_at_tool_call=False)
    parser = ReasoningParser(True, ends_at_tool_call=False)
    assert parser.feed("x<tool_") == ("x<tool_", "")  # nothing held back for <tool_call>
    probe = parser.fresh()
    assert (probe.starts_in_reasoning, probe.ends_at_tool_call, probe.feed("y")) == (True, False, ("y", ""))


SPLIT_TEXTS = [
    "<think>\nR1\n</think>\n\nC1 <tool_call>x",
    "\nA<B</think\n</think>\n\n\nC</think>",
    "r<tool_call><tool_call>",
    "<thin<think></think>",
    "\n\n<think>x\n\n<tool_call>",
]


@pytest.mark.parametrize("text", SPLIT_TEXTS)
@pytest.mark.parametrize("starts", [True, False])
def test_every_single_and_double_cut_matches_whole(text, starts):
    expected = whole(text, starts)
    n = len(text)
    for i in range(n + 1):
        assert stream(text, [i], starts) == expected, i
        for j in range(i, n + 1):
            assert stream(text, [i, j], starts) == expected, (i, j)
    assert stream(text, list(range(1, n)), starts) == expected  # one character per delta


PIECES = st.sampled_from(
    ["<think>", "</think>", "<tool_call>", "\n", "\n\n", "<", "</", "think>", "a", "b c", "é🙂"])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(PIECES, max_size=14), starts=st.booleans(), ends=st.booleans(), data=st.data())
def test_stream_equals_whole_for_random_cuts(parts, starts, ends, data):
    text = "".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    assert stream(text, cuts, starts, ends) == whole(text, starts, ends)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(PIECES, max_size=14))
def test_content_is_text_from_content_start(parts):
    text = "".join(parts)
    reasoning, content, start = whole(text)
    assert (content is None) == (start is None)
    if content is not None:
        assert text[start:] == content
    assert reasoning is None or reasoning == reasoning.strip("\n")


def render(enable_thinking: bool | None, messages: list[dict] | None = None) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(TEMPLATE.read_text())
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    messages = messages or [{"role": "user", "content": "What does <think> mean?"}]
    return template.render(messages=messages, add_generation_prompt=True, **kwargs)


def test_prompt_opens_reasoning_follows_the_published_template():
    assert render(None).endswith("<|im_start|>assistant\n<think>")
    assert prompt_opens_reasoning(render(None))
    assert prompt_opens_reasoning(render(True))
    assert not prompt_opens_reasoning(render(False))
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet"},
        {"role": "user", "content": "again"},
    ]
    assert prompt_opens_reasoning(render(None, history))
    assert not prompt_opens_reasoning(render(False, history))
    assert not prompt_opens_reasoning("<|im_start|>user\nWhat is <think>?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\nhalf-written reasoning")


def test_round_trip_through_the_template_keeps_reasoning_and_content():
    reasoning, content, _ = whole("\nthink a bit\n</think>\n\nthe answer")
    rendered = render(None, [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": content, "reasoning_content": reasoning},
    ])
    assert rendered.endswith("<think>think a bit</think>\n\nthe answer<|im_end|>\n<|im_start|>assistant\n<think>")


def test_count_reasoning_tokens():
    ids = dict(think_start_id=1, think_end_id=2, tool_call_start_id=3)
    assert count_reasoning_tokens([9, 9, 9, 2, 8, 8], starts_in_reasoning=True, **ids) == 3
    assert count_reasoning_tokens([1, 9, 9, 2, 8], starts_in_reasoning=True, **ids) == 2
    assert count_reasoning_tokens([9, 9, 3, 8, 8], starts_in_reasoning=True, **ids) == 2
    assert count_reasoning_tokens([9, 9, 9, 9], starts_in_reasoning=True, **ids) == 4  # truncated
    assert count_reasoning_tokens([9, 2, 9], starts_in_reasoning=False, **ids) == 0
    assert count_reasoning_tokens([], starts_in_reasoning=True, **ids) == 0
    no_tools = dict(ids, tool_call_start_id=None)
    assert count_reasoning_tokens([9, 3, 9, 2, 8], starts_in_reasoning=True, **no_tools) == 3
