"""Stop strings in generated text: where the first one starts, and how much of the text's end might still become
one. The engine cuts a sample's text with them (text_output.py); the OpenAI layer applies a request's stop
strings to the content after the reasoning (serve/openai/choice.py)."""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """(position, stop string) of the earliest stop string in text[start:] (by position, then the smaller
    string), or None."""
    return min(((i, s) for s in stops if (i := text.find(s, start)) >= 0), default=None)


def open_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (text that must be held back
    while more may come)."""
    longest = max((len(s) for s in stops), default=1) - 1
    for length in range(min(longest, len(text)), 0, -1):
        tail = text[-length:]
        if any(stop.startswith(tail) for stop in stops):
            return length
    return 0
