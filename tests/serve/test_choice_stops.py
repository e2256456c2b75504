"""Stop strings apply to the content only, whole and streamed in any pieces."""

from __future__ import annotations

import pytest

from s1serve.serve.openai.choice import ChoiceText
from s1serve.serve.parsers.reasoning import ReasoningParser
from s1serve.serve.parsers.response import ResponseParser


def run(text: str, cut: list[int], stops: list[str], include: bool = False, thinking: bool = True):
    choice = ChoiceText.create(ResponseParser(ReasoningParser(thinking)), stops, include)
    reasoning, content = "", ""
    bounds = [0, *cut, len(text)]
    for a, b in zip(bounds, bounds[1:]):
        delta = choice.push(text[a:b])
        reasoning += delta.reasoning_content
        content += delta.content
        if choice.stopped:
            break
    tail = choice.finish()
    return reasoning + tail.reasoning_content, content + tail.content, choice


TEXT = "I should STOP and think.</think>\n\nThe answer STOP is here."


@pytest.mark.parametrize("cut", [[], *[[i] for i in range(1, len(TEXT))], list(range(1, len(TEXT)))])
def test_stop_in_reasoning_is_ignored_and_stop_in_content_cuts(cut):
    reasoning, content, choice = run(TEXT, cut, ["STOP"])
    assert reasoning == "I should STOP and think."
    assert content == "The answer "
    assert choice.stopped
    parsed = choice.parsed("length")
    assert (parsed.reasoning_content, parsed.content, parsed.finish_reason) == (reasoning, content, "stop")


def test_include_stop_str_and_no_match():
    _, content, choice = run(TEXT, [30], ["STOP"], include=True)
    assert content == "The answer STOP" and choice.stopped
    _, content, choice = run(TEXT, [30], ["NOPE"])
    assert content == "The answer STOP is here." and not choice.stopped
    assert choice.parsed("length").finish_reason == "length"


def test_without_thinking_stops_apply_from_the_start():
    _, content, choice = run("abc STOP def", [5], ["STOP"], thinking=False)
    assert content == "abc " and choice.stopped


def test_earliest_of_several_stops_wins_and_partial_prefix_is_released_at_the_end():
    _, content, _ = run("x</think>one two three", [12], ["three", "two"])
    assert content == "one "
    _, content, choice = run("x</think>ends with th", [13], ["three"])
    assert content == "ends with th" and not choice.stopped
