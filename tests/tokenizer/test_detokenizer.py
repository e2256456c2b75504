"""Streaming detokenization: deltas add up to decode(all ids) and never show a broken character."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s1serve.tokenizer import IncrementalDetokenizer, InvalidTokenIdError, Tokenizer

FLAGS = [(False, False), (False, True), (True, False), (True, True)]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text pieces that split into several byte tokens, plus the tokens that stand apart or get skipped.
PIECES = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(["😀", "🫠", "龘", "𠀀", "👨‍👩‍👧‍👦", "🇯🇵", "中文字符", "한국어", "é", "e\u0301", "𝔘", "\u200d", " ", "\n\n"]),
    st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>",
                     "<|image_pad|>", "<IMG_CONTEXT>", "<SMILES>CCO</SMILES>", "<dna>ACGT</dna>"]),
)


def stream(tokenizer: Tokenizer, ids: list[int], skip: bool, spaces: bool) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
    deltas = [detok.feed(i) for i in ids]
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return deltas


@SETTINGS
@given(pieces=st.lists(PIECES, max_size=12))
def test_deltas_of_real_text_add_up_and_are_whole(tokenizer: Tokenizer, pieces: list[str]) -> None:
    ids = tokenizer.encode("".join(pieces))
    for skip, spaces in FLAGS:
        deltas = stream(tokenizer, ids, skip, spaces)
        full = tokenizer.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        assert "".join(deltas) == full
        for delta in deltas:
            delta.encode("utf-8")  # raises on a broken character
            if "\ufffd" not in full:
                assert "\ufffd" not in delta


@SETTINGS
@given(data=st.data())
def test_deltas_of_any_ids_add_up(tokenizer: Tokenizer, data: st.DataObject) -> None:
    """Arbitrary ids: lone UTF-8 lead and continuation bytes, domain pieces, special and added tokens."""
    token_id = st.one_of(
        st.integers(0, 255),  # single bytes (the byte-level alphabet)
        st.integers(151643, 151693),  # added tokens
        st.integers(0, tokenizer.vocab_size - 1),
    )
    ids = data.draw(st.lists(token_id, max_size=40))
    for skip, spaces in FLAGS:
        deltas = stream(tokenizer, ids, skip, spaces)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)
        for delta in deltas:
            delta.encode("utf-8")


def test_a_character_split_over_tokens_waits_for_its_last_byte(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🫠")  # three byte tokens
    assert len(ids) == 3
    assert stream(tokenizer, ids, True, True) == ["", "", "🫠", ""]


def test_unfinished_character_shows_as_replacement_at_the_end(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a🫠")[:-1]
    deltas = stream(tokenizer, ids, True, True)
    assert deltas[-1] == "\ufffd" and "".join(deltas) == tokenizer.decode(ids)


def test_skipped_special_token_does_not_break_a_character(tokenizer: Tokenizer) -> None:
    emoji = tokenizer.encode("🫠")
    im_end = tokenizer.token_to_id("<|im_end|>")
    ids = emoji[:1] + [im_end] + emoji[1:]
    assert stream(tokenizer, ids, True, False) == ["", "", "", "🫠", ""]
    assert "".join(stream(tokenizer, ids, False, False)) == tokenizer.decode(ids, False, False)


def test_standalone_tokens_are_spaced_as_decode_spaces_them(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a<think>b</think>c")
    assert "".join(stream(tokenizer, ids, True, True)) == "a <think> b </think> c"
    assert "".join(stream(tokenizer, ids, True, False)) == "a<think>b</think>c"


def test_never_decodes_the_whole_text(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each feed costs O(1): the detokenizer never falls back to decoding everything so far."""
    ids = tokenizer.encode("Streaming 中文 and 😀 text <think>x</think> " * 50)
    detok = IncrementalDetokenizer(tokenizer)
    monkeypatch.setattr(Tokenizer, "decode", lambda *a, **k: pytest.fail("decode called"))
    text = "".join(detok.feed(i) for i in ids) + detok.finish()
    monkeypatch.undo()
    assert text == tokenizer.decode(ids)


def test_bad_use_is_reported(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[1, 2, 3])
    with pytest.raises(InvalidTokenIdError, match="outside the vocabulary"):
        detok.feed(tokenizer.vocab_size)
    with pytest.raises(InvalidTokenIdError):
        detok.feed(-1)
    detok.finish()
    assert detok.finish() == ""
    with pytest.raises(RuntimeError, match="after finish"):
        detok.feed(1)
