"""The grammar engine behind constrained decoding: llguidance compiles a request's `Constraint` and a per-request
`GrammarMatcher` tells the sampler which token ids may come next (the others' logits become -inf).

The grammar engine sees s1serve's own token table (`Tokenizer.token_bytes()`): every id's bytes, the 51 added
tokens as whole tokens only (text can never spell `<tool_call>`), ids past the tokenizer (up to the model's
vocab_size) never allowed. Why llguidance and the measurements: docs/structured_output.md. The grammars
themselves are built beside the OpenAI protocol (serve/openai/grammars.py).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import llguidance
import llguidance.torch as llguidance_torch
import torch

from s1serve.constraints import Constraint, StructuredOutputError
from s1serve.engine.grammar import bitmask_to_bool, bitmask_width, check_bitmask
from s1serve.errors import S1ServeError


class GrammarViolationError(S1ServeError, RuntimeError):
    """A token the grammar does not allow was given to `GrammarMatcher.accept` (a sampler/mask bug)."""


class _TokenTable:
    """What llguidance's TokenizerWrapper reads: every id's bytes, the added (whole-token-only) ids, EOS, and an
    encoder (llguidance tokenizes text the grammar forces, e.g. after a max_tokens bound)."""

    def __init__(
        self,
        token_bytes: Sequence[bytes],
        special_ids: Sequence[int],
        eos_token_id: int,
        encode: Callable[[str], list[int]],
    ) -> None:
        self.tokens = token_bytes
        self.special_token_ids = list(special_ids)
        self.eos_token_id = eos_token_id
        self.bos_token_id = None
        self._encode = encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


class GrammarCompiler:
    """The token table turned into llguidance's tokenizer (once; ~0.3 s for 155k ids), and an LRU cache of
    compiled grammars keyed by constraint. `matcher(constraint)` is cheap after the first time."""

    def __init__(
        self,
        token_bytes: Sequence[bytes],
        *,
        vocab_size: int,
        special_ids: Iterable[int],
        eos_token_id: int,
        encode: Callable[[str], list[int]],
        cache_size: int = 256,
    ) -> None:
        if vocab_size < len(token_bytes):
            raise StructuredOutputError(f"vocab_size {vocab_size} is smaller than the token table ({len(token_bytes)})")
        # Ids with no bytes (past the tokenizer, or unassigned) are never allowed: llguidance skips empty tokens.
        table = list(token_bytes) + [b""] * (vocab_size - len(token_bytes))
        specials = sorted({i for i in special_ids if table[i]})
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_TokenTable(table, specials, eos_token_id, encode)),
            n_vocab=vocab_size,
            eos_token=eos_token_id,
        )
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._executor: llguidance.LLExecutor | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, eos_token_id: int | None = None) -> GrammarCompiler:
        """From an s1serve `Tokenizer`: its `token_bytes()`, its added tokens (special or standalone) as
        whole tokens, and its first EOS id (`<|im_end|>`) unless another is given."""
        n = tokenizer.vocab_size
        # Added tokens: those decode skips as special, and the others it keeps as standalone text.
        added = [i for i in range(n) if tokenizer.is_special(i) or tokenizer.standalone_text(i) is not None]
        return cls(
            tokenizer.token_bytes(),
            vocab_size=vocab_size,
            special_ids=added,
            eos_token_id=tokenizer.eos_token_ids[0] if eos_token_id is None else eos_token_id,
            encode=tokenizer.encode,
        )

    def validate(self, constraint: Constraint) -> None:
        """Compile (and cache) the constraint now; raises StructuredOutputError when the grammar is invalid."""
        self._compiled(constraint)

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        return GrammarMatcher(self._compiled(constraint).deep_copy(), self.vocab_size, self.eos_token_id)

    def _compiled(self, constraint: Constraint) -> llguidance.LLMatcher:
        key = constraint.grammar
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = llguidance.LLMatcher.grammar_from_lark(key)
        compiled = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if compiled.is_error():
            error = _first_line(compiled.get_error())
            raise StructuredOutputError(f"cannot build the {constraint.kind} grammar: {error}")
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def fill_bitmasks(self, matchers: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        """Masks of several matchers at once (llguidance's thread pool): matcher k -> row `index` of `bitmask`
        (int32, CPU, contiguous, [rows, ceil(vocab_size / 32)])."""
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        check_bitmask(bitmask, self.vocab_size)
        llguidance_torch.fill_next_token_bitmask_par(self._executor, [(m._m, i) for m, i in matchers], bitmask)
        for matcher, _ in matchers:
            matcher._raise_if_error()


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


class GrammarMatcher:
    """One request's position in its grammar. Not thread-safe; one per request."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_token_id: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._finished = False

    def fill_bitmask(self, bitmask_row: torch.Tensor) -> None:
        """Allowed next tokens as bits into an int32 CPU row of ceil(vocab_size / 32) words."""
        check_bitmask(bitmask_row, self.vocab_size)
        self._m.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)
        self._raise_if_error()

    def allowed_token_mask(self) -> torch.Tensor:
        """bool [vocab_size]: True where the token may come next."""
        words = torch.empty(bitmask_width(self.vocab_size), dtype=torch.int32)
        self.fill_bitmask(words)
        return bitmask_to_bool(words, self.vocab_size)

    def fill_mask(self, mask_row: torch.Tensor) -> None:
        """Writes allowed_token_mask() into a bool row (any device) of at least vocab_size entries; entries past
        vocab_size are set False."""
        allowed = self.allowed_token_mask().to(mask_row.device)
        mask_row[: self.vocab_size] = allowed
        mask_row[self.vocab_size :] = False

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token. A token the grammar does not allow raises GrammarViolationError and
        leaves the matcher where it was."""
        if self._finished:
            raise GrammarViolationError(f"token {token_id} came after the end of the constrained output")
        if token_id == self.eos_token_id:
            allowed = self._m.is_accepting()
        else:
            allowed = 0 <= token_id < self.vocab_size and self._m.validate_tokens([token_id]) == 1
        if not allowed:
            raise GrammarViolationError(f"token {token_id} is not allowed here by the grammar")
        if not self._m.consume_token(token_id):
            error = _first_line(self._m.get_error())
            raise GrammarViolationError(f"grammar matcher failed on token {token_id}: {error}")
        if token_id == self.eos_token_id:
            self._finished = True

    def fork(self) -> GrammarMatcher:
        """An independent copy at the same position."""
        twin = GrammarMatcher(self._m.deep_copy(), self.vocab_size, self.eos_token_id)
        twin._finished = self._finished
        return twin

    def is_finished(self) -> bool:
        """True once the end-of-sequence token has been accepted."""
        return self._finished

    def is_accepting(self) -> bool:
        """True when the output so far is complete (the end-of-sequence token is allowed now)."""
        return self._m.is_accepting()

    def _raise_if_error(self) -> None:
        if self._m.is_error():
            raise GrammarViolationError(f"grammar matcher failed: {_first_line(self._m.get_error())}")
