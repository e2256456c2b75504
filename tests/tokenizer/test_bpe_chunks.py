"""The chunk cache in front of Rust BPE must give exactly what one Rust call on the whole text gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from s1serve.assets import ASSETS_DIR
from s1serve.tokenizer.bpe import ByteLevelBPE, _chunks

BPE = ByteLevelBPE(ASSETS_DIR / "vocab.json", ASSETS_DIR / "merges.txt")
TINY_CACHE = ByteLevelBPE(ASSETS_DIR / "vocab.json", ASSETS_DIR / "merges.txt", max_cached_chars=40, max_chunk_chars=8)

# Spaces of every kind next to letters, digits, marks and symbols: where pre-tokens start and end.
ALPHABET = st.sampled_from(
    list(" \t\n\r\x0b\x0c\x1c\x85\u00a0\u1680\u2000\u2028\u3000\u180e\u200b\ufeff\u2581")
    + list("aZé中ア한0١²'s.,!-_()[]<>\"") + ["'S", "'ll", "\u0301", "😀", "👍🏽", "\U0001d518"]
)
TEXTS = st.lists(ALPHABET, max_size=40).map("".join) | st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_chunks_partition_the_text(text: str) -> None:
    chunks = _chunks(text)
    assert "".join(chunks) == text and all(chunks)


@settings(max_examples=200, deadline=None)
@given(st.lists(TEXTS, min_size=1, max_size=4))
def test_cached_ids_equal_one_rust_call(texts: list[str]) -> None:
    """Encode several texts (so later ones hit chunks the earlier ones cached) and compare each with
    Rust's own answer for the whole text (U+2581 read as a space, as the reference does)."""
    for text in texts:
        text = text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
        expected = BPE._encode_uncached(text.replace("\u2581", " "))
        assert BPE.encode(text) == expected
        assert TINY_CACHE.encode(text) == expected
