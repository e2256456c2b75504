"""A sample's text: incremental detokenization, stop strings, and what may be streamed yet.

Stop strings are matched on the detokenized text and are not part of the output. While a sample runs, the
longest end of its text that could still grow into a stop string is held back from the stream.
"""

from __future__ import annotations

from typing import Any, Protocol

from s1serve.engine.isolation import StageError
from s1serve.engine.stop_strings import find_stop, open_stop_prefix


class Detokenizer(Protocol):
    def feed(self, token_id: int) -> str:
        """One id -> the text it completes (possibly empty)."""

    def finish(self) -> str:
        """End of the stream -> the text still pending (an unfinished UTF-8 sequence shows as U+FFFD)."""


class TokenizerDetokenizer:
    """The seam to the tokenizer package. Ids the model has but the tokenizer lacks (the embedding is padded
    past the vocabulary) add no text."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special: bool, spaces_between_special: bool):
        from s1serve.tokenizer import IncrementalDetokenizer

        self._known = tokenizer.vocab_size
        self._detok = IncrementalDetokenizer(
            tokenizer,
            prompt_ids=prompt_ids,
            skip_special_tokens=skip_special,
            spaces_between_special_tokens=spaces_between_special,
        )

    def feed(self, token_id: int) -> str:
        return self._detok.feed(token_id) if token_id < self._known else ""

    def finish(self) -> str:
        return self._detok.finish()


class TextOutput:
    def __init__(self, detokenizer: Detokenizer | None, stop: tuple[str, ...]):
        self._detokenizer = detokenizer
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._stopped = False
        self.text = ""
        self._emitted = 0

    def append(self, token_id: int) -> str | None:
        """Adds a token's text; returns the stop string it completed (the text then ends before it), if any.
        A failure raises StageError naming the stage ("detokenizer" or "stop")."""
        if self._detokenizer is None:
            return None
        try:
            piece = self._detokenizer.feed(token_id)
        except Exception as exc:
            raise StageError("detokenizer", exc) from exc
        return self._checked_add(piece)

    def finish(self) -> None:
        """The sample ended: adds the detokenizer's pending text, unless a stop string already cut the text."""
        if self._detokenizer is not None and not self._stopped:
            try:
                piece = self._detokenizer.finish()
            except Exception as exc:
                raise StageError("detokenizer", exc) from exc
            self._checked_add(piece)

    def _checked_add(self, piece: str) -> str | None:
        try:
            return self._add(piece)
        except Exception as exc:
            raise StageError("stop", exc) from exc

    def _add(self, piece: str) -> str | None:
        before = len(self.text)
        self.text += piece
        if not self._stop or not piece:
            return None
        hit = find_stop(self.text, self._stop, max(0, before - self._holdback))
        if hit is None:
            return None
        position, stop = hit
        self.text = self.text[:position]
        self._stopped = True
        return stop

    def delta(self, finished: bool) -> str:
        """Text not streamed yet; while running, minus what could still turn out to start a stop string."""
        held = open_stop_prefix(self.text, self._stop)
        end = len(self.text) if finished else max(self._emitted, len(self.text) - held)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
