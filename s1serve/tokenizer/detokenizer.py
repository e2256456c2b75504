"""Streaming detokenization: ids in one at a time, text deltas out, never a broken character.

`Tokenizer.decode` joins the bytes of consecutive byte tokens and decodes them as UTF-8 with replacement;
non-special added tokens stand as their own parts, joined by a space when spaces_between_special_tokens. Here
the bytes go through Python's incremental UTF-8 decoder, which returns only complete characters and holds
back an unfinished sequence until its next byte arrives (or until the run of bytes ends), so each token costs
O(1) and the deltas add up to `decode(all ids)` exactly.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from s1serve.tokenizer.errors import InvalidTokenIdError
from s1serve.tokenizer.tokenizer import Tokenizer

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class IncrementalDetokenizer:
    """Feed ids with `feed`; call `finish` once at the end of the stream for the final delta.

    `prompt_ids` is accepted for callers that pass the prompt along, and ignored: byte-level text does not
    depend on the tokens before the output (unlike SentencePiece's leading-space rule).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        del prompt_ids
        self._tokenizer = tokenizer
        self._bytes = tokenizer.token_bytes()
        self._skip = skip_special_tokens
        self._separator = " " if spaces_between_special_tokens else ""
        self._decoder = _Utf8Decoder(errors="replace")
        self._in_run = False  # inside a run of byte tokens
        self._separator_due = False  # the current run still owes the separator before its first text
        self._parts = 0
        self._chunks: list[str] = []
        self.finished = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def feed(self, token_id: int) -> str:
        """One id -> the text it completes (possibly empty)."""
        if self.finished:
            raise RuntimeError("feed() after finish()")
        tok = self._tokenizer
        if not 0 <= token_id < len(self._bytes):
            raise InvalidTokenIdError(f"token id {token_id} is outside the vocabulary [0, {len(self._bytes)})")
        if self._skip and tok.is_special(token_id):
            return ""
        standalone = tok.standalone_text(token_id)
        if standalone is not None:
            delta = self._end_run() + (self._separator if self._parts else "") + standalone
            self._parts += 1
        else:
            if not self._in_run:
                self._in_run = True
                self._separator_due = self._parts > 0
                self._parts += 1
            delta = self._with_separator(self._decoder.decode(self._bytes[token_id]))
        if delta:
            self._chunks.append(delta)
        return delta

    def finish(self) -> str:
        """End of stream: an unfinished UTF-8 sequence at the end becomes U+FFFD, as decode shows it."""
        if self.finished:
            return ""
        self.finished = True
        delta = self._end_run()
        if delta:
            self._chunks.append(delta)
        return delta

    def _end_run(self) -> str:
        if not self._in_run:
            return ""
        self._in_run = False
        tail = self._with_separator(self._decoder.decode(b"", final=True))
        self._decoder.reset()
        return tail

    def _with_separator(self, text: str) -> str:
        if text and self._separator_due:
            self._separator_due = False
            return self._separator + text
        return text
