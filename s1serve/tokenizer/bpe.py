"""Qwen2 byte-level BPE on the Rust `tokenizers` library, with a cache of space-delimited chunks.

The reference pre-tokenises with the Qwen2 regex and runs BPE on each piece. `tokenizers` does the same in
Rust, but a call still costs about 0.25 us per character. Most text repeats its words, so we cut the text at
places where the regex always starts a new piece (a space followed by a non-space character), remember the
ids of each chunk, and send only unseen chunks to Rust, joined into one call.
"""

from __future__ import annotations

from collections.abc import Callable
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

# A space followed by one of these may be part of a longer whitespace piece, so no chunk starts there.
# str.isspace() covers Unicode White_Space; these are the characters some regex engines also call space.
_EXTRA_SPACE = frozenset("\u180e\u200b\ufeff")


class ByteLevelBPE:
    """Text (no added tokens in it) -> ids, exactly as the reference's `_bpe_tokenize` + vocab lookup."""

    def __init__(
        self,
        vocab_file: Path,
        merges_file: Path,
        *,
        max_cached_chars: int = 1 << 22,
        max_chunk_chars: int = 4096,
        flag: Callable[[str], bool] | None = None,
    ) -> None:
        """`flag(chunk)` is asked once per new chunk; `unflagged_ids` declines texts with a flagged chunk."""
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
        # chunk -> ids; emptied when the chunks in it pass max_cached_chars in all (a long-running server
        # sees unbounded new text).
        self._cache: dict[str, list[int]] = {}
        self._flag = flag
        self._flagged: set[str] = set()
        self._cached_chars = 0
        self._max_cached_chars = max_cached_chars
        self._max_chunk_chars = max_chunk_chars

    def encode(self, text: str) -> list[int]:
        if SP_SPACE in text:
            text = text.replace(SP_SPACE, " ")
        chunks = _chunks(text)
        cache = self._cache
        found = [cache.get(c) for c in chunks]
        if None in found:
            self._fill([c for c, ids in zip(chunks, found) if ids is None])
            found = [cache.get(c) for c in chunks]
            found = [self._encode_uncached(c) if ids is None else ids for c, ids in zip(chunks, found)]
        out: list[int] = []
        for ids in found:
            out += ids
        return out

    def unflagged_ids(self, text: str) -> list[int] | None:
        """The ids of `text` if every chunk of it is cached and none was flagged; None otherwise."""
        found = self._unflagged(text)
        if found is None:
            return None
        out: list[int] = []
        for ids in found:
            out += ids
        return out

    def is_unflagged(self, text: str) -> bool:
        return self._unflagged(text) is not None

    def _unflagged(self, text: str) -> list[list[int]] | None:
        if SP_SPACE in text:
            text = text.replace(SP_SPACE, " ")
        chunks = _chunks(text)
        found = [self._cache.get(c) for c in chunks]
        if None in found or not self._flagged.isdisjoint(chunks):
            return None
        return found  # type: ignore[return-value]

    def _encode_uncached(self, text: str) -> list[int]:
        return self._rust.encode(text, add_special_tokens=False).ids

    def _fill(self, missing: list[str]) -> None:
        """Encode the unseen chunks in one Rust call; split the ids back by their character offsets
        (chunks start where a pre-token starts, so no token straddles two chunks)."""
        short = list(dict.fromkeys(c for c in missing if len(c) <= self._max_chunk_chars))
        if not short:
            return
        size = sum(map(len, short))
        if self._cached_chars + size > self._max_cached_chars:
            self._cache.clear()
            self._flagged.clear()
            self._cached_chars = 0
        if self._flag is not None:
            self._flagged.update(c for c in short if self._flag(c))
        self._cached_chars += size
        encoding = self._rust.encode("".join(short), add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
        first, n, end = 0, len(ids), 0
        for chunk in short:
            end += len(chunk)
            last = first
            while last < n and offsets[last][0] < end:
                last += 1
            self._cache[chunk] = ids[first:last]
            first = last


def _chunks(text: str) -> list[str]:
    """Cut `text` before each space that is followed by a non-space character (the regex always
    starts a piece there and no earlier piece can reach over it)."""
    parts = text.split(" ")
    out = [parts[0]] if parts[0] else []
    for part in parts[1:]:
        if out and (not part or part[0].isspace() or part[0] in _EXTRA_SPACE):
            out[-1] += " " + part
        else:
            out.append(" " + part)
    return out
