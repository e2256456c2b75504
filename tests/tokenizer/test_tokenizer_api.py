"""Loading, the public surface, and bad input: clear errors, never a crash."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import golden

from s1serve.assets import ASSETS_DIR
from s1serve.tokenizer import InvalidTokenIdError, Tokenizer, TokenizerError, load_tokenizer


def _assets_json(name: str) -> dict:
    return json.loads((ASSETS_DIR / name).read_text(encoding="utf-8"))


def test_stop_ids_come_from_the_checkpoint_files(tokenizer: Tokenizer) -> None:
    eos = tokenizer.token_to_id(_assets_json("tokenizer_config.json")["eos_token"])
    assert eos in tokenizer.eos_token_ids
    assert set(_assets_json("generation_config.json")["eos_token_id"]) <= set(tokenizer.eos_token_ids)


def test_vocabulary_size_and_lookups(tokenizer: Tokenizer) -> None:
    config = _assets_json("tokenizer_config.json")
    added = {int(i): spec["content"] for i, spec in config["added_tokens_decoder"].items()}
    last_domain = spm.SentencePieceProcessor(model_file=str(ASSETS_DIR / "tokenizer_XNA.model"))
    assert tokenizer.vocab_size == config["offset_XNA"] + last_domain.get_piece_size()
    for token_id, content in added.items():
        assert tokenizer.token_to_id(content) == token_id
        assert tokenizer.convert_ids_to_tokens(token_id) == content
    assert tokenizer.token_to_id("no such token") is None
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi")


def test_token_bytes_agree_with_decode(tokenizer: Tokenizer) -> None:
    table = tokenizer.token_bytes()
    assert len(table) == tokenizer.vocab_size
    for token_id in range(tokenizer.vocab_size):
        decoded = tokenizer.decode([token_id], skip_special_tokens=False)
        assert table[token_id].decode("utf-8", "replace") == decoded
    ids = tokenizer.encode("Grammar engines read 字节 and 🫠 and <SMILES>CC(=O)O</SMILES> byte by byte.")
    text = b"".join(table[i] for i in ids).decode("utf-8")
    assert text == tokenizer.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False)


@pytest.mark.parametrize("bad", [b"bytes", None, 42, ["a"]])
def test_encode_rejects_non_text(tokenizer: Tokenizer, bad: object) -> None:
    with pytest.raises(TokenizerError, match="expects str"):
        tokenizer.encode(bad)  # type: ignore[arg-type]


def test_encode_rejects_lone_surrogates(tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match=r"U\+D800 at index 2"):
        tokenizer.encode("ab\ud800c")


def test_encode_of_empty_text(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("") == []
    assert tokenizer.decode([]) == ""


@pytest.mark.parametrize("ids", [[-1], [10**9], [5, 154766], [1, "2"], [1.5]])
def test_decode_rejects_ids_outside_the_vocabulary(tokenizer: Tokenizer, ids: list) -> None:
    with pytest.raises(InvalidTokenIdError):
        tokenizer.decode(ids)
    with pytest.raises(InvalidTokenIdError):
        tokenizer.convert_ids_to_tokens(ids)


def test_decode_of_invalid_utf8_bytes_replaces_them(tokenizer: Tokenizer) -> None:
    lone = [tokenizer.encode("🫠")[1]]  # a continuation byte on its own
    assert tokenizer.decode(lone) == "\ufffd"
    assert tokenizer.decode(lone + tokenizer.encode("ok")) == "\ufffdok"


def test_decode_accepts_integer_like_ids(tokenizer: Tokenizer) -> None:
    np = pytest.importorskip("numpy")
    ids = tokenizer.encode("numpy ids")
    assert tokenizer.decode(np.array(ids)) == "numpy ids"
    assert tokenizer.decode(ids[0]) == tokenizer.decode(ids[:1])


def test_concurrent_encoding_gives_the_same_ids(tokenizer: Tokenizer) -> None:
    cases = golden("encode_golden")["cases"][:400]
    errors: list[str] = []

    def work() -> None:
        for case in cases:
            if tokenizer.encode(case["text"]) != case["ids"]:
                errors.append(case["text"])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _copy_assets(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(ASSETS_DIR, folder, ignore=shutil.ignore_patterns("__*"))
    return folder


def test_checkpoint_files_are_read_not_the_vendored_ones(tmp_path: Path) -> None:
    folder = _copy_assets(tmp_path)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7]}), encoding="utf-8")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["hello"], vocab["Hello"] = vocab["Hello"], vocab["hello"]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    loaded = load_tokenizer(folder)
    assert 7 in loaded.eos_token_ids
    assert loaded.encode("Hello") == [vocab["Hello"]] != load_tokenizer(ASSETS_DIR).encode("Hello")


def test_folder_without_tokenizer_files_uses_the_published_ones(tmp_path: Path, tokenizer: Tokenizer) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode("same ids <SMILES>CCO</SMILES>") == tokenizer.encode("same ids <SMILES>CCO</SMILES>")


def test_folder_with_some_tokenizer_files_fails(tmp_path: Path) -> None:
    folder = _copy_assets(tmp_path)
    (folder / "merges.txt").unlink()
    (folder / "tokenizer_XNA.model").unlink()
    with pytest.raises(TokenizerError, match="merges.txt, tokenizer_XNA.model"):
        load_tokenizer(folder)


def test_missing_folder_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    folder = _copy_assets(tmp_path)
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="offset_SMILES"):
        load_tokenizer(folder)
