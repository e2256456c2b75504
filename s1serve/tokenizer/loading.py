"""Reading a checkpoint folder's tokenizer files (or the published ones in s1serve/assets) into a Tokenizer."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sentencepiece as spm

from s1serve.assets import ASSETS_DIR
from s1serve.config import read_eos_token_ids
from s1serve.tokenizer.bpe import ByteLevelBPE
from s1serve.tokenizer.chat_template import ChatTemplate
from s1serve.tokenizer.domain import PROTEIN, SMILES, XNA
from s1serve.tokenizer.errors import TokenizerError
from s1serve.tokenizer.tokenizer import DomainModel, Tokenizer

logger = logging.getLogger(__name__)

_SP_FILES = {SMILES: "tokenizer_SMILES.model", PROTEIN: "tokenizer_PROT.model", XNA: "tokenizer_XNA.model"}
_REQUIRED_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt", *_SP_FILES.values())
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Tokenizer:
    """Read the tokenizer of a checkpoint folder. A folder with none of the tokenizer files (e.g. a tiny test
    checkpoint) uses the published files shipped in s1serve/assets; a folder with some but not all fails."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise TokenizerError(f"checkpoint folder {folder} does not exist")
    present = [name for name in _REQUIRED_FILES if (folder / name).is_file()]
    if not present:
        logger.warning("%s has no tokenizer files; using the published ones in %s", folder, ASSETS_DIR)
        folder = ASSETS_DIR
    elif missing := [name for name in _REQUIRED_FILES if name not in present]:
        raise TokenizerError(f"{folder} lacks tokenizer files: {', '.join(missing)}")

    config = _read_json(folder / "tokenizer_config.json")
    vocab = _read_json(folder / "vocab.json")
    added = _added_tokens(folder, config)
    special_map = _special_tokens_map(folder, config)
    specials = [v for k, v in special_map.items() if k != "additional_special_tokens"]
    specials += special_map.get("additional_special_tokens", [])
    by_content = {content: i for i, content in added.items()}

    domains: dict[str, DomainModel] = {}
    for name, filename in _SP_FILES.items():
        offset = config.get(f"offset_{name}")
        if not isinstance(offset, int):
            raise TokenizerError(f"tokenizer_config.json lacks the integer offset_{name}")
        model = spm.SentencePieceProcessor()
        try:
            model.Load(str(folder / filename))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot load {folder / filename}: {exc}") from exc
        unk = model.unk_id()
        pieces = [model.id_to_piece(j) for j in range(model.get_piece_size())]
        remap = {vocab[piece]: j + offset for j, piece in enumerate(pieces) if j != unk and piece in vocab}
        piece_ids = {piece: by_content.get(piece, j + offset) for j, piece in enumerate(pieces) if j}
        domains[name] = DomainModel(name, model, offset, pieces, remap, piece_ids)

    eos = [by_content[t] for t in [special_map.get("eos_token")] if t in by_content]
    eos += read_eos_token_ids(Path(model_dir))
    return Tokenizer(
        # BPE on its own serves only text inside tags and around detected spans: a smaller cache will do.
        bpe=ByteLevelBPE(folder / "vocab.json", folder / "merges.txt", max_cached_chars=1 << 20),
        vocab=vocab,
        added_tokens=added,
        special_tokens=specials,
        special_tokens_map=special_map,
        domains=domains,
        eos_token_ids=eos,
        chat_template=_chat_template(folder, config),
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc


def _added_tokens(folder: Path, config: Mapping[str, Any]) -> dict[int, str]:
    """id -> content, from tokenizer_config's added_tokens_decoder, else added_tokens.json."""
    decoder = config.get("added_tokens_decoder")
    try:
        if decoder:
            added = {}
            for key, spec in decoder.items():
                if any(spec.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
                    raise TokenizerError(f"added token {spec['content']!r} strips spaces or matches whole words; "
                                         "s1serve does not support that")
                added[int(key)] = spec["content"]
            return added
        path = folder / "added_tokens.json"
        return {int(i): content for content, i in _read_json(path).items()} if path.is_file() else {}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, TokenizerError):
            raise
        raise TokenizerError(f"malformed added tokens in {folder}: {exc!r}") from exc


def _special_tokens_map(folder: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """bos/eos/pad/... and additional_special_tokens as strings; tokenizer_config first, then
    special_tokens_map.json for what it leaves out."""
    extra_path = folder / "special_tokens_map.json"
    extra = _read_json(extra_path) if extra_path.is_file() else {}
    out: dict[str, Any] = {}
    for key in (*_SPECIAL_ATTRIBUTES, "additional_special_tokens"):
        value = config.get(key)
        if value is None:
            value = extra.get(key)
        if value is None:
            continue
        if key == "additional_special_tokens":
            out[key] = [v["content"] if isinstance(v, dict) else v for v in value]
        else:
            out[key] = value["content"] if isinstance(value, dict) else value
    return out


def _chat_template(folder: Path, config: Mapping[str, Any]) -> ChatTemplate | None:
    path = folder / "chat_template.jinja"
    if path.is_file():
        return ChatTemplate(path.read_text(encoding="utf-8"))
    source = config.get("chat_template")
    if source is None:
        return None
    if isinstance(source, list):  # named templates, as transformers stores several
        return ChatTemplate({t["name"]: t["template"] for t in source})
    return ChatTemplate(source)
