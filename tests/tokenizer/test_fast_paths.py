"""The encode fast path (detection and ids cached per chunk, NFC line by line, domain pieces read from their
strings) must give what the step-by-step path gives."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from s1serve.assets import ASSETS_DIR
from s1serve.tokenizer import load_tokenizer
from s1serve.tokenizer.domain import split_auto_detected
from s1serve.tokenizer.tokenizer import _nfc

TOK = load_tokenizer(ASSETS_DIR)  # one tokenizer, so later examples also hit chunks cached by earlier ones

# SMILES, protein and nucleic-acid material, bracket atoms (with spaces and U+2581 inside), ordinary words,
# spaces of several kinds, U+2581, and spelled-out markers.
PIECES = st.sampled_from(
    ["C", "c", "N", "O", "S", "Cl", "Br", "(", ")", "=", "#", "-", ".", "1", "2", "%12", "@", "+", "[NH4+]",
     "[C H]", "[C\u2581H]", "[", "]", "CC(=O)Oc1ccccc1C(=O)O", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ",
     "ACGTACGTACGTACGTACGTACGTACGTA", "word", "x", "é", "中", " ", "  ", "\n", "\t", "\u2581", "\u3000",
     "<SMILES_AUTO_DETECT>", "</PROT_AUTO_DETECT>"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, max_size=40).map("".join))
def test_chunk_by_chunk_detection_agrees_with_whole_text_detection(text: str) -> None:
    expected = TOK._encode_pieces(split_auto_detected(text), [])
    assert TOK.encode(text) == expected
    assert TOK.encode(text) == expected  # now from the cache


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["e", "\u0301", "\u0327", "\n", "\r", " ", "A", "\u212b", "\uac00", "\u11a8", "x"]),
                max_size=30).map("".join) | st.text(max_size=30))
def test_nfc_line_by_line_is_nfc(text: str) -> None:
    assert _nfc(text) == unicodedata.normalize("NFC", text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("CNOScnos()=#123[]+ ACGTUMKLEIé中😀\n\u2581")), max_size=30))
def test_pieces_the_domain_models_do_not_know_are_exactly_id_0(text: str) -> None:
    for domain in {id(d): d for d in TOK._domain_begin.values()}.values():
        ids = domain.model.encode(text)
        pieces = domain.model.encode(text, out_type=str)
        assert [domain.piece_ids.get(p) is None for p in pieces] == [i == 0 for i in ids]
