"""The shortcuts around domain detection must never change a decision."""

from __future__ import annotations

from conftest import golden
from hypothesis import given, settings
from hypothesis import strategies as st

from s1serve.assets import ASSETS_DIR
from s1serve.tokenizer import load_tokenizer
from s1serve.tokenizer.bpe import _chunks
from s1serve.tokenizer.domain import may_hold_span, split_auto_detected

# Element symbols, ring digits, bonds, amino-acid and nucleotide letters, ordinary words and spaces.
PIECES = st.sampled_from(
    ["C", "c", "N", "n", "O", "o", "S", "Cl", "Br", "Co", "Xe", "H", "(", ")", "=", "#", "-", ".", ":", "/", "\\",
     "1", "2", "%12", "@", "+", "ACGT", "AUGC", "MKTAYIAK", "QWERTY", "word", "x", " ", "  ", "\n", "é", "٣", "<",
     "<SMILES_AUTO_DETECT>", "</PROT_AUTO_DETECT>"]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(PIECES, max_size=60).map("".join))
def test_unflagged_chunks_mean_nothing_to_detect(text: str) -> None:
    if "[" not in text and not any(may_hold_span(c) for c in _chunks(text)):
        assert split_auto_detected(text) == [text]


def test_second_encoding_takes_the_cached_paths_and_agrees() -> None:
    """A fresh tokenizer, two passes over the golden corpus: the second pass answers from the chunk cache
    and skips detection for chunks known to be plain; both must give the reference's ids."""
    tok = load_tokenizer(ASSETS_DIR)
    cases = golden("encode_golden")["cases"]
    for _ in range(2):
        wrong = [c["text"] for c in cases if tok.encode(c["text"]) != c["ids"]]
        assert not wrong
