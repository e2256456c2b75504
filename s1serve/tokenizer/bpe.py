"""Qwen2 byte-level BPE on the Rust `tokenizers` library, with a cache of space-delimited chunks.

The reference pre-tokenises with the Qwen2 regex and runs BPE on each piece. `tokenizers` does the same in
Rust, but a call still costs about 0.5 us per character. Most text repeats its words, so we cut the text at
places where the regex always starts a new piece (a space followed by a non-space character), remember the
ids of each chunk, and send only unseen chunks to Rust, joined into one call.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from s1serve.tokenizer.errors import TokenizerError

# The Qwen2 pre-tokenisation regex, as the reference writes it.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The reference turns SentencePiece's word marker into a space before BPE, in every piece it BPE-encodes.
SP_SPACE = "\u2581"

# A chunk: its first character, then anything up to the next space that is followed by a non-space
# character. `\s` is str.isspace(); U+180E, U+200B and U+FEFF count as space too, since some regex engines
# call them space (so a space before one may belong to a longer whitespace piece).
_NOT_SPACE = r"[^\s\u180e\u200b\ufeff]"
_CHUNK = re.compile(rf".[^ ]*(?: (?!{_NOT_SPACE})[^ ]*)*", re.DOTALL)


def _chunks(text: str) -> list[str]:
    """Cut `text` before each space that is followed by a non-space character (the regex always
    starts a piece there and no earlier piece can reach over it)."""
    return _CHUNK.findall(text)


class ChunkCache:
    """chunk -> ids, for chunks that encode independently of their neighbours. Emptied when the chunks in it
    pass `max_chars` in all (a long-running server sees unbounded new text); longer chunks are not kept.
    The ids are kept as tuples: CPython stops tracking a tuple of ints, so a big cache costs the garbage
    collector nothing."""

    def __init__(self, max_chars: int, max_chunk_chars: int) -> None:
        self._ids: dict[str, tuple[int, ...]] = {}
        self._chars = 0
        self._max_chars = max_chars
        self._max_chunk_chars = max_chunk_chars

    def encode(self, chunks: list[str], encode_new: Callable[[list[str]], Sequence[Sequence[int]]]) -> list[int]:
        """The ids of the chunks of a text; `encode_new(chunks)` gives those of its distinct unseen chunks, in
        text order."""
        known = self._ids
        try:  # all seen before: no Python-level loop
            return list(chain.from_iterable(map(known.__getitem__, chunks)))
        except KeyError:
            pass
        # A snapshot: another thread may empty the cache meanwhile.
        found: dict[str, tuple[int, ...] | None] = {c: known.get(c) for c in chunks}
        new = [c for c, ids in found.items() if ids is None]
        found.update(zip(new, map(tuple, encode_new(new))))
        if self._chars > self._max_chars:
            known.clear()
            self._chars = 0
        for c in new:
            if len(c) <= self._max_chunk_chars:  # a longer word is rare, and costly to keep
                known[c] = found[c]
                self._chars += len(c)
        return list(chain.from_iterable(map(found.__getitem__, chunks)))


class ByteLevelBPE:
    """Text (no added tokens in it) -> ids, exactly as the reference's `_bpe_tokenize` + vocab lookup."""

    def __init__(
        self,
        vocab_file: Path,
        merges_file: Path,
        *,
        max_cached_chars: int = 1 << 22,
        max_chunk_chars: int = 4096,
    ) -> None:
        try:
            model = models.BPE.from_file(str(vocab_file), str(merges_file))
        except Exception as exc:  # the Rust error says which line is bad
            raise TokenizerError(f"cannot read BPE files {vocab_file} / {merges_file}: {exc}") from exc
        self._rust = Tokenizer(model)
        self._rust.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        self._rust.encode("warm up: the first call builds the regex (~1.5 ms)", add_special_tokens=False)
        self._cache = ChunkCache(max_cached_chars, max_chunk_chars)

    def encode(self, text: str) -> list[int]:
        if SP_SPACE in text:
            text = text.replace(SP_SPACE, " ")
        return self._cache.encode(_chunks(text), self.encode_chunks)

    def encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        """The ids of each chunk, in one Rust call on the chunks joined; the ids are split back by their
        character offsets. Every chunk but the first must start with a space followed by a non-space
        character, so that no token straddles two chunks. (Rust's pre-split input, `is_pretokenized`, would
        keep them apart too, but costs more and runs on a thread pool.)"""
        if len(chunks) <= 1:
            return [self._encode_uncached(c) for c in chunks]
        encoding = self._rust.encode("".join(chunks), add_special_tokens=False)
        ids = encoding.ids
        starts = [start for start, _ in encoding.offsets]
        out: list[list[int]] = []
        first = end = 0
        for chunk in chunks:
            end += len(chunk)
            last = bisect_left(starts, end, first)
            out.append(ids[first:last])
            first = last
        return out

    def _encode_uncached(self, text: str) -> list[int]:
        return self._rust.encode(text, add_special_tokens=False).ids
