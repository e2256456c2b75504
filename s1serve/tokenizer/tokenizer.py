"""The Intern-S1 tokenizer: the reference's exact ids, byte-level BPE in Rust, domain spans in SentencePiece.

Encoding follows `tokenization_interns1.py` step by step:
1. NFC-normalise the text.
2. Cut out added tokens and the `<MOLFORMULA>` / `</MOLFORMULA>` protection tags.
3. Outside explicit domain tags and protection tags, wrap auto-detected SMILES / protein / DNA-RNA spans in
   transient markers (see domain.py).
4. Walk the pieces with a stack of domain models: a begin tag or marker pushes its SentencePiece model, an
   end tag or marker pops the top one (whatever it is). Text is encoded by the model on top of the stack,
   or by byte-level BPE when the stack is empty. SentencePiece's unknown pieces fall back to BPE, and
   BPE tokens met while the stack is not empty take the domain model's id when the model knows the same
   string (the reference looks every token string up in the domain model first). Markers get no id;
   protection tags are spelled out in BPE.

Steps 3 and 4 are done in one pass, and text outside any tag (the bulk of a prompt) chunk by chunk: a
detected span never reaches across a chunk boundary, so each chunk's final ids, spans included, are
computed once and cached; a text seen before in pieces costs a few dictionary lookups.
"""

from __future__ import annotations

import gc
import operator
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sentencepiece as spm

from s1serve.tokenizer.bpe import _NOT_SPACE, SP_SPACE, ByteLevelBPE, ChunkCache
from s1serve.tokenizer.bytelevel import char_to_byte
from s1serve.tokenizer.chat_template import ChatTemplate
from s1serve.tokenizer.domain import (
    AUTO_BEGIN,
    AUTO_END,
    PROTEIN,
    SMILES,
    SPAN_START,
    XNA,
    may_hold_span,
    split_auto_detected,
)
from s1serve.tokenizer.errors import ChatTemplateError, InvalidTokenIdError, TokenizerError

# Explicit tags -> domain model, as the reference maps them.
_EXPLICIT_TAGS = {"SMILES": SMILES, "protein": PROTEIN, "dna": XNA, "rna": XNA}
_PROTECT_BEGIN, _PROTECT_END = "<MOLFORMULA>", "</MOLFORMULA>"
_SURROGATE = re.compile("[\ud800-\udfff]")
_DOMAIN_CACHE_SIZE = 1 << 14
_PLAIN_CACHE_CHARS, _MAX_CACHED_CHUNK_CHARS = 1 << 22, 4096
# Text outside tags is cut as BPE text is (see bpe._chunks), so that detection too can work chunk by chunk,
# with two exceptions: "[...]" stays whole (a SMILES bracket atom may hold spaces), and so does a space
# between whitespace and a possible span (BPE gets the text before a span on its own, and there that space
# ends a longer whitespace piece).
_UNCUT_SPACE = rf"(?: (?!{_NOT_SPACE})|(?<=[\s\u180e\u200b\ufeff]) (?={SPAN_START}))"
_PLAIN_CHUNK = re.compile(rf".[^ ]*(?:{_UNCUT_SPACE}[^ ]*)*", re.DOTALL)
_BRACKETED_CHUNK = re.compile(rf"(?:\[[^\]]*\]|.)(?:[^ \[]+|\[[^\]]*\]|\[|{_UNCUT_SPACE})*", re.DOTALL)


@dataclass(frozen=True)
class DomainModel:
    """One SentencePiece model and where its ids live in the shared vocabulary."""

    name: str
    model: spm.SentencePieceProcessor
    offset: int
    pieces: Sequence[str]
    # BPE id -> this model's id, for BPE token strings the model also knows.
    bpe_to_domain: Mapping[int, int]
    # Piece -> vocabulary id (the added token of the same string if there is one, else offset + piece id),
    # for every piece but id 0, which the reference takes for "unknown".
    piece_ids: Mapping[str, int]


class Tokenizer:
    """Encode/decode for Intern-S1(-Pro). Build it with `load_tokenizer(model_dir)` (loading.py)."""

    def __init__(
        self,
        *,
        bpe: ByteLevelBPE,
        vocab: Mapping[str, int],
        added_tokens: Mapping[int, str],
        special_tokens: Sequence[str],
        special_tokens_map: Mapping[str, Any],
        domains: Mapping[str, DomainModel],
        eos_token_ids: Sequence[int],
        chat_template: ChatTemplate | None,
    ) -> None:
        self._bpe = bpe
        self._vocab = dict(vocab)
        self._added = {content: i for i, content in added_tokens.items()}
        if overlap := sorted(set(self._added) & set(self._vocab)):
            raise TokenizerError(f"added tokens {overlap[:5]} also appear in vocab.json; this layout is not supported")
        self.special_tokens_map = dict(special_tokens_map)
        self.chat_template = chat_template

        # id -> token string, the way the reference shows it: added tokens, then domain pieces, then vocab.json.
        tokens: dict[int, str] = {i: t for t, i in self._vocab.items()}
        for domain in domains.values():
            tokens.update({domain.offset + j: piece for j, piece in enumerate(domain.pieces)})
        tokens.update(added_tokens)
        self.vocab_size = max(tokens) + 1
        self._tokens: tuple[str | None, ...] = tuple(tokens.get(i) for i in range(self.vocab_size))
        token_bytes = [_token_bytes(t) if t is not None else b"" for t in self._tokens]
        for i, content in added_tokens.items():
            token_bytes[i] = content.encode("utf-8")
        self._bytes = tuple(token_bytes)

        # Decoding: special tokens (bos/eos/pad/additional) are skipped on request; the other added tokens
        # stand as their own parts of the text, joined by a space when spaces_between_special_tokens.
        # (An additional special token above the base vocabulary also stands apart, as in transformers.)
        specials = set(special_tokens)
        additional = set(special_tokens_map.get("additional_special_tokens", ()))
        self._skip_ids = frozenset(i for i, t in enumerate(self._tokens) if t in specials)
        base_size = len(self._vocab.keys() | _placeholder_names(domains.values()))
        self._standalone = {
            i: t for t, i in self._added.items() if t not in specials or (t in additional and i >= base_size)
        }
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))

        # Encoding: where text is cut, and what each cut-out string does.
        self._domain_begin: dict[str, DomainModel] = {f"<{tag}>": domains[d] for tag, d in _EXPLICIT_TAGS.items()}
        self._domain_begin.update({marker: domains[d] for marker, d in AUTO_BEGIN.items()})
        self._domain_end = {f"</{tag}>" for tag in _EXPLICIT_TAGS} | set(AUTO_END)
        self._explicit_begin = {f"<{tag}>" for tag in _EXPLICIT_TAGS} | {_PROTECT_BEGIN}
        self._explicit_end = {f"</{tag}>" for tag in _EXPLICIT_TAGS} | {_PROTECT_END}
        self._protect = {_PROTECT_BEGIN, _PROTECT_END}
        self._tags = self._protect | self._domain_begin.keys() | self._domain_end  # cut-out strings that do more
        cut = sorted(set(self._added) | self._protect, key=len, reverse=True)
        self._cut_pattern = re.compile("(" + "|".join(map(re.escape, cut)) + ")")
        self._cut_initials = re.compile("[" + "".join(sorted({re.escape(t[0]) for t in cut})) + "]")
        # (domain, text) -> ids: SentencePiece's Python wrapper costs ~10 us a call, and prompts repeat.
        self._domain_cache: dict[tuple[str, str], list[int]] = {}
        # Chunk of text outside any tag -> its final ids (detected spans included).
        self._plain = ChunkCache(_PLAIN_CACHE_CHARS, _MAX_CACHED_CHUNK_CHARS)
        # CPython's young collections scan each container they hold, element by element: have one see the
        # two 155K-entry tuples above now (it stops tracking them: they hold no containers) and move the
        # caches out of the young generations, rather than doing it in the first requests (~10 ms there).
        gc.collect(1)

    # ---- encode -------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. The published tokenizer adds no BOS/EOS, so `add_special_tokens` changes nothing."""
        del add_special_tokens
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        if not text.isascii():
            if bad := _SURROGATE.search(text):
                raise TokenizerError(
                    f"text holds an unpaired surrogate U+{ord(bad.group()):04X} at index {bad.start()}; "
                    "it cannot be encoded as UTF-8"
                )
            text = _nfc(text)
        if not self._cut_initials.search(text):
            return self._encode_text([], text, 0)
        ids: list[int] = []
        stack: list[DomainModel] = []
        depth = 0  # explicit tags and protection tags open around this point: no detection inside
        for piece in self._cut_pattern.split(text):
            if piece in self._tags:
                if piece in self._explicit_begin:
                    depth += 1
                elif piece in self._explicit_end:
                    depth = max(0, depth - 1)
                ids += self._encode_pieces([piece], stack)
            elif piece in self._added:
                ids.append(self._added[piece])
            elif piece:
                ids += self._encode_text(stack, piece, depth)
        return ids

    def _encode_text(self, stack: list[DomainModel], text: str, depth: int) -> list[int]:
        """A piece of text between added tokens. The common case (no tag open, no marker spelled out) goes
        chunk by chunk through the cache of final ids, detection included."""
        if depth:
            return self._encode_pieces([text], stack)
        if stack or "_AUTO_DETECT>" in text:
            return self._encode_pieces(split_auto_detected(text), stack)
        return self._plain.encode(_plain_chunks(text), self._encode_new_chunks)

    def _encode_new_chunks(self, chunks: list[str]) -> list[list[int]]:
        """Final ids of unseen chunks outside any tag. A detected span never holds a space outside a
        bracket atom (chunks keep those whole), and the checks around a span look at most one character
        beyond it, so each chunk is detected on its own; the spans found are exactly the whole text's."""
        if may_hold_span("".join(chunks)):
            pieces = [split_auto_detected(c) for c in chunks]
        else:
            pieces = [[c] for c in chunks]
        # The chunks without a span go to Rust together.
        plain = iter(self._bpe.encode_chunks([p[0].replace(SP_SPACE, " ") for p in pieces if len(p) == 1]))
        return [next(plain) if len(p) == 1 else self._encode_pieces(p, []) for p in pieces]

    def _encode_pieces(self, pieces: list[str], stack: list[DomainModel]) -> list[int]:
        """Pieces (added tokens, markers, text) -> ids, pushing and popping domain models on `stack`."""
        ids: list[int] = []
        for piece in pieces:
            if piece in self._protect:
                ids += self._bpe_in(stack, piece)
            elif piece in self._domain_begin:
                if piece in self._added:
                    ids.append(self._added[piece])
                stack.append(self._domain_begin[piece])
            elif piece in self._domain_end:
                if piece in self._added:
                    ids.append(self._added[piece])
                if stack:
                    stack.pop()
            elif piece in self._added:
                ids.append(self._added[piece])
            elif stack:
                ids += self._encode_domain(stack, piece)
            else:
                ids += self._bpe.encode(piece)
        return ids

    def _bpe_in(self, stack: list[DomainModel], text: str) -> list[int]:
        ids = self._bpe.encode(text)
        if not stack:
            return ids
        remap = stack[-1].bpe_to_domain
        return [remap.get(i, i) for i in ids]

    def _encode_domain(self, stack: list[DomainModel], text: str) -> list[int]:
        key = (stack[-1].name, text)
        ids = self._domain_cache.get(key)
        if ids is None:
            ids = self._encode_domain_uncached(stack, text)
            if len(self._domain_cache) >= _DOMAIN_CACHE_SIZE:
                self._domain_cache.clear()
            self._domain_cache[key] = ids
        return ids

    def _encode_domain_uncached(self, stack: list[DomainModel], text: str) -> list[int]:
        domain = stack[-1]
        ids: list[int] = []
        # The reference encodes twice (pieces, then their ids); the pieces alone tell the same, as a piece
        # of id 0 ("unknown") is text the model has no piece for.
        for piece in domain.model.encode(text, out_type=str):
            piece_id = domain.piece_ids.get(piece)
            if piece_id is None:
                ids += self._bpe_in(stack, piece)  # U+2581 reads as a space there
            else:
                ids.append(piece_id)
        return ids

    # ---- decode -------------------------------------------------------------------------------------------

    def decode(
        self,
        ids: Iterable[int] | int,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """Ids -> text. Byte tokens are joined and decoded as UTF-8 (bad bytes become U+FFFD); added tokens
        that are not special stand apart, joined by a space when `spaces_between_special_tokens`."""
        ids = self._checked_ids(ids)
        skip = self._skip_ids if skip_special_tokens else frozenset()
        table, standalone = self._bytes, self._standalone
        parts: list[str] = []
        run: list[bytes] = []
        for i in ids:
            if i in skip:
                continue
            text = standalone.get(i)
            if text is None:
                run.append(table[i])
                continue
            if run:
                parts.append(b"".join(run).decode("utf-8", "replace"))
                run = []
            parts.append(text)
        if run:
            parts.append(b"".join(run).decode("utf-8", "replace"))
        return (" " if spaces_between_special_tokens else "").join(parts)

    def convert_ids_to_tokens(self, ids: Iterable[int] | int) -> list[str] | str:
        """Ids -> token strings as in the vocabulary (byte-level symbols, SentencePiece pieces, added tokens)."""
        if isinstance(ids, int):
            return self.convert_ids_to_tokens([ids])[0]
        return [self._tokens[i] for i in self._checked_ids(ids)]  # type: ignore[misc]

    def token_to_id(self, token: str) -> int | None:
        """An added token or a vocab.json entry -> its id; None when there is none."""
        found = self._added.get(token)
        return found if found is not None else self._vocab.get(token)

    def token_bytes(self) -> tuple[bytes, ...]:
        """id -> the bytes the token stands for (an added token: its text), for every id below vocab_size."""
        return self._bytes

    def is_special(self, token_id: int) -> bool:
        """True for the ids decode drops when skip_special_tokens."""
        return token_id in self._skip_ids

    def standalone_text(self, token_id: int) -> str | None:
        """The text of an added token that decodes as its own part of the text (see decode), else None."""
        return self._standalone.get(token_id)

    def _checked_ids(self, ids: Iterable[int] | int) -> list[int]:
        if isinstance(ids, int):
            ids = [ids]
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError as exc:
            raise InvalidTokenIdError(f"token ids must be integers: {exc}") from None
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise InvalidTokenIdError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if any(self._tokens[i] is None for i in ids):
            bad = next(i for i in ids if self._tokens[i] is None)
            raise InvalidTokenIdError(f"token id {bad} is not assigned to any token")
        return ids

    # ---- chat template ------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **chat_template_kwargs: Any,
    ) -> str:
        """Render a conversation with the checkpoint's chat template (transformers' rules, sandboxed)."""
        if self.chat_template is None:
            raise ChatTemplateError("this checkpoint has no chat template (chat_template.jinja or tokenizer_config)")
        kwargs = {**self.special_tokens_map, **chat_template_kwargs}
        return self.chat_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)


def _plain_chunks(text: str) -> list[str]:
    """Text outside any tag -> chunks that encode on their own, detection included: cut where its BPE text
    (U+2581 read as a space) may be cut, never inside "[...]"."""
    pattern = _BRACKETED_CHUNK if "[" in text else _PLAIN_CHUNK
    if SP_SPACE not in text:
        return pattern.findall(text)
    return [text[m.start() : m.end()] for m in pattern.finditer(text.replace(SP_SPACE, " "))]


def _nfc(text: str) -> str:
    """NFC, line by line: a newline never takes part in normalisation, and in a long prompt most lines are
    already NFC (checking is much cheaper than normalising)."""
    if "\n" not in text:
        return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)
    return "\n".join([line if line.isascii() else _nfc(line) for line in text.split("\n")])


def _placeholder_names(domains: Iterable[DomainModel]) -> set[str]:
    """The reference also files every domain piece in its vocabulary as `<|NAME_piece|>`."""
    return {f"<|{d.name}_{piece}|>" for d in domains for piece in d.pieces}


def _token_bytes(token: str) -> bytes:
    """A vocabulary string -> its bytes. SentencePiece pieces use U+2581 for space and raw newlines; the
    reference maps those to the byte-level symbols first. A character outside the byte-level alphabet (the
    reference would fail on it) is taken as its UTF-8 bytes."""
    table = char_to_byte()
    token = token.replace(SP_SPACE, "\u0120").replace("\n", "\u010a")
    out = bytearray()
    for c in token:
        b = table.get(c)
        if b is None:
            out += c.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)
