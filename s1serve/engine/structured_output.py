"""Constrained decoding: `tool_choice` required / named and `response_format` json_object / json_schema.

A request's constraint becomes a grammar (llguidance's Lark dialect with inline JSON Schemas); a per-request
`GrammarMatcher` tells the sampler which token ids may come next, and the sampler sets the other logits to -inf.
The grammar engine sees s1serve's own token table (`Tokenizer.token_bytes()`): every id's bytes, the 51 added
tokens as whole tokens only (text can never spell `<tool_call>`), ids past the tokenizer (up to the model's
vocab_size) never allowed. Why llguidance, the measurements and the grammar's shape: docs/structured_output.md.

What the grammar accepts, in order:
  1. when the prompt leaves the model inside `<think>` (thinking mode): reasoning text that cannot spell
     `</think>`, at most `Limits.reasoning_tokens` tokens, then the `</think>` token, then up to two "\\n";
  2. tool calls, as the chat template teaches them: `<tool_call>\\n{"name": "<fn>", "arguments": {...}}\\n</tool_call>`,
     several separated by "\\n" (at most `Limits.max_calls`); or one JSON value for response_format;
  3. the end-of-sequence token `<|im_end|>`, which is the only token allowed once the rest is complete.
JSON is compact with the separators the template's `tojson` writes (", " and ": "). `Limits` keep every part
finite: with `Limits.for_max_tokens(max_tokens)` even a random-weight model ends with valid calls in time.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.torch as llguidance_torch
import numpy as np
import torch

from s1serve.errors import S1ServeError

THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# Inside <tool_call> ... </tool_call>, exactly as the chat template renders a call.
_CALL_HEAD = '\n{"name": '
_CALL_TAIL = "}\n"
# JSON as the chat template's `tojson` writes it (Python json.dumps separators).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
_ANY_DEF = "s1serve_any"
# Tokens Limits.for_max_tokens keeps for the answer (tool calls / JSON) before it gives reasoning a share.
ANSWER_RESERVE = 64


class StructuredOutputError(S1ServeError, ValueError):
    """A constraint cannot be built: a bad tool list or JSON Schema, or a name that is not among the tools."""


class GrammarViolationError(S1ServeError, RuntimeError):
    """A token the grammar does not allow was given to `GrammarMatcher.accept` (a sampler/mask bug)."""


# ---- limits ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Bounds that make every constrained output finite. None means unbounded.

    reasoning_tokens: tokens of reasoning before `</think>` is forced (0: close the reasoning at once).
    string_length: characters of a JSON string or free-form object key that the schema leaves unbounded
        (strings with enum/const are never touched; a schema's own smaller maxLength wins).
    max_calls: tool calls in one response when parallel calls are allowed.
    """

    reasoning_tokens: int | None = None
    string_length: int | None = None
    max_calls: int | None = None

    def __post_init__(self) -> None:
        for name in ("reasoning_tokens", "string_length", "max_calls"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise StructuredOutputError(f"Limits.{name} must be a non-negative integer or None, got {value!r}")
        if self.max_calls == 0:
            raise StructuredOutputError("Limits.max_calls must be at least 1")

    @classmethod
    def for_max_tokens(cls, max_tokens: int) -> Limits:
        """Limits scaled to a request's token budget B: 64 tokens are kept for the answer and reasoning may use
        half of the rest; a free JSON string or key holds at most max(16, B/8) characters; one parallel call is
        allowed per 256 tokens (at least one). A real model rarely meets these before max_tokens itself; a
        random-weight model ends its tool calls within B (docs/structured_output.md has the measurements)."""
        if max_tokens < 1:
            raise StructuredOutputError(f"max_tokens must be at least 1, got {max_tokens}")
        return cls(
            reasoning_tokens=max(0, max_tokens - ANSWER_RESERVE) // 2,
            string_length=max(16, max_tokens // 8),
            max_calls=max(1, max_tokens // 256),
        )


# ---- constraints ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """A grammar in llguidance's Lark dialect; equal constraints share one compiled grammar."""

    kind: str  # "tool_calls", "json" or "reasoning_budget"
    grammar: str


def tool_call_constraint(
    tools: Sequence[Mapping[str, Any]],
    names: Sequence[str] | None = None,
    parallel: bool = True,
    starts_in_reasoning: bool = True,
    limits: Limits = Limits(),
) -> Constraint:
    """One or more tool calls (exactly one when not `parallel`), each naming one of `names` (default: every
    tool) with arguments valid against that tool's `parameters` schema. `tools` are OpenAI tool entries
    (`{"type": "function", "function": {...}}`) or bare function objects. tool_choice "required" is
    names=None; a named function is names=[name] (OpenAI returns one call for it: pass parallel=False)."""
    functions = _functions(tools)
    if names is None:
        chosen = list(functions)
    else:
        if isinstance(names, (str, bytes)):
            raise StructuredOutputError("names must be a list of function names")
        chosen = list(dict.fromkeys(names))
        if not chosen:
            raise StructuredOutputError("at least one function name must be allowed")
        unknown = [n for n in chosen if n not in functions]
        if unknown:
            raise StructuredOutputError(
                f"function {unknown[0]!r} is not among the tools ({', '.join(functions) or 'none'})"
            )
    if not chosen:
        raise StructuredOutputError("tool calls need at least one tool")
    rules = []
    alternatives = []
    for i, name in enumerate(chosen):
        head = json.dumps(name, ensure_ascii=False) + ', "arguments": '
        rules.append(f"fn_{i}: {_lark_string(head)} args_{i}")
        rules.append(f"args_{i}: %json {_json_schema_text(functions[name], limits)}")
        alternatives.append(f"fn_{i}")
    if not parallel or limits.max_calls == 1:
        calls = "call"
    elif limits.max_calls is None:
        calls = 'call ("\\n" call)*'
    else:
        calls = f'call ("\\n" call){{0,{limits.max_calls - 1}}}'
    lines = [
        f"start: {_reasoning_prefix(starts_in_reasoning, limits)}calls",
        f"calls: {calls}",
        f"call: {TOOL_CALL_START} {_lark_string(_CALL_HEAD)} ({' | '.join(alternatives)}) "
        f"{_lark_string(_CALL_TAIL)} {TOOL_CALL_END}",
        *rules,
        *_reasoning_rules(starts_in_reasoning, limits),
    ]
    return Constraint("tool_calls", "\n".join(lines))


def json_constraint(
    schema: Mapping[str, Any] | None,
    starts_in_reasoning: bool = True,
    limits: Limits = Limits(),
) -> Constraint:
    """One JSON value valid against `schema` (response_format json_schema), or any JSON object when `schema`
    is None (json_object)."""
    if schema is None:
        schema = {"type": "object"}
    lines = [
        f"start: {_reasoning_prefix(starts_in_reasoning, limits)}value",
        f"value: %json {_json_schema_text(schema, limits)}",
        *_reasoning_rules(starts_in_reasoning, limits),
    ]
    return Constraint("json", "\n".join(lines))


def reasoning_budget_constraint(limits: Limits) -> Constraint:
    """A thinking budget on a free answer (the Messages API's `thinking.budget_tokens`): at most
    `limits.reasoning_tokens` tokens of reasoning, then `</think>`, then any text, tool-call tags included.
    Only for a prompt that opens the reasoning."""
    if limits.reasoning_tokens is None:
        raise StructuredOutputError("a reasoning budget needs Limits.reasoning_tokens")
    lines = [
        f"start: {_reasoning_prefix(True, limits)}answer",
        f"answer: (TEXT | {TOOL_CALL_START} | {TOOL_CALL_END})*",
        r"TEXT: /(?s:.+)/",
        *_reasoning_rules(True, limits),
    ]
    return Constraint("reasoning_budget", "\n".join(lines))


def _functions(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """name -> parameters schema, in tool order."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise StructuredOutputError("tools must be a list of tool objects")
    out: dict[str, Mapping[str, Any]] = {}
    for k, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise StructuredOutputError(f"tools[{k}] has no function name")
        if name in out:
            raise StructuredOutputError(f"tools[{k}]: function name {name!r} is declared twice")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise StructuredOutputError(f"tools[{k}] ({name}): parameters must be a JSON Schema object")
        out[name] = parameters
    return out


# Added tokens are written as themselves (`<tool_call>`): in llguidance's Lark a `<...>` names a whole token.
def _reasoning_prefix(starts_in_reasoning: bool, limits: Limits) -> str:
    if not starts_in_reasoning:
        return ""
    if limits.reasoning_tokens == 0:
        return f"{THINK_END} AFTER_THINK "
    return f"think {THINK_END} AFTER_THINK "


def _reasoning_rules(starts_in_reasoning: bool, limits: Limits) -> list[str]:
    if not starts_in_reasoning:
        return []
    if limits.reasoning_tokens == 0:
        return [r"AFTER_THINK: /\n{0,2}/"]
    if limits.reasoning_tokens is None:
        think = "think: THINK"
    else:
        think = f"think[max_tokens={limits.reasoning_tokens}]: THINK"
    # Any text that does not spell "</think>" (the reasoning parser splits at the first one it sees).
    return [
        think,
        r"THINK: /(?s:.*)/ & ~/(?s:.*)<\/think>(?s:.*)/",
        r"AFTER_THINK: /\n{0,2}/",
    ]


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# ---- JSON Schema bounding -------------------------------------------------------------------------------------

# Keywords that constrain a value; a schema with none of them accepts any JSON value.
_ASSERTIONS = frozenset(
    "type enum const anyOf oneOf allOf not $ref properties patternProperties additionalProperties items "
    "prefixItems required minLength maxLength pattern format minimum maximum exclusiveMinimum exclusiveMaximum "
    "multipleOf minItems maxItems minProperties maxProperties if then else contains".split()
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
# Sub-schemas whose values appear in the output. `not` and `if` are left alone: bounding them would widen
# or flip what they exclude.
_SCHEMA_VALUES = ("then", "else", "contains")


def _json_schema_text(schema: Mapping[str, Any], limits: Limits) -> str:
    if not isinstance(schema, Mapping):
        raise StructuredOutputError("a JSON Schema must be an object")
    try:
        bounded = bound_schema(schema, limits.string_length)
    except (TypeError, ValueError, RecursionError) as exc:
        raise StructuredOutputError(f"invalid JSON Schema: {exc}") from None
    bounded["x-guidance"] = dict(_JSON_STYLE)
    return json.dumps(bounded, ensure_ascii=False, sort_keys=False)


def bound_schema(schema: Mapping[str, Any], string_length: int | None) -> dict[str, Any]:
    """A copy of `schema` with the rules constrained decoding adds: an object that lists `properties` and says
    nothing of `additionalProperties` gets none (OpenAI strict / xgrammar strict semantics); with
    `string_length`, strings without enum/const get maxLength <= string_length, and free-form object keys
    (additionalProperties, schema-less objects) are limited to that many characters, as is any value a
    sub-schema leaves unconstrained."""
    root = copy.deepcopy(dict(schema))
    uses_any = [False]

    def any_value() -> dict[str, Any]:
        uses_any[0] = True
        return {"$ref": f"#/$defs/{_ANY_DEF}"}

    def key_pattern() -> str:
        return f"^(?s:.{{0,{string_length}}})$"

    def walk(node: Any, *, top: bool = False) -> Any:
        if node is True or (isinstance(node, dict) and not top and not (node.keys() & _ASSERTIONS)):
            return any_value() if string_length is not None else node
        if not isinstance(node, dict):
            return node
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                node[key] = {k: walk(v) for k, v in node[key].items()}
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                node[key] = [walk(v) for v in node[key]]
        for key in _SCHEMA_VALUES:
            if key in node:
                node[key] = walk(node[key])
        if "items" in node:
            items = node["items"]
            node["items"] = [walk(v) for v in items] if isinstance(items, list) else walk(items)
        types = node.get("type")
        types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
        if "additionalProperties" in node and node["additionalProperties"] is not False:
            node["additionalProperties"] = walk(node["additionalProperties"])
        is_object = "object" in types or "properties" in node or "additionalProperties" in node
        if is_object and "additionalProperties" not in node:
            node["additionalProperties"] = False if "properties" in node else True
        if string_length is None:
            return node
        extra = node.get("additionalProperties")
        if is_object and extra is not False and "patternProperties" not in node:
            node["patternProperties"] = {key_pattern(): any_value() if extra is True else extra}
            node["additionalProperties"] = False
        if ("string" in types or (not types and ("pattern" in node or "format" in node))) and not (
            "enum" in node or "const" in node
        ):
            cap = max(string_length, int(node.get("minLength", 0)))
            node["maxLength"] = min(int(node.get("maxLength", cap)), cap)
        return node

    if string_length is not None and not (root.keys() & _ASSERTIONS):
        root["$ref"] = any_value()["$ref"]
    root = walk(root, top=True)
    if uses_any[0]:
        s = string_length
        anything = {
            "anyOf": [
                {"type": "string", "maxLength": s},
                {"type": "number"},
                {"type": "boolean"},
                {"type": "null"},
                {"type": "array", "items": {"$ref": f"#/$defs/{_ANY_DEF}"}},
                {
                    "type": "object",
                    "patternProperties": {key_pattern(): {"$ref": f"#/$defs/{_ANY_DEF}"}},
                    "additionalProperties": False,
                },
            ]
        }
        defs = root.setdefault("$defs", {})
        if not isinstance(defs, dict):
            raise StructuredOutputError("$defs must be an object")
        defs[_ANY_DEF] = anything
    return root


# ---- grammar engine -------------------------------------------------------------------------------------------


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
        _check_bitmask(bitmask, self.vocab_size)
        llguidance_torch.fill_next_token_bitmask_par(self._executor, [(m._m, i) for m, i in matchers], bitmask)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _check_bitmask(bitmask: torch.Tensor, vocab_size: int) -> None:
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous():
        raise ValueError("a token bitmask is a contiguous int32 CPU tensor")
    if bitmask.shape[-1] != bitmask_width(vocab_size):
        raise ValueError(f"a token bitmask row has {bitmask_width(vocab_size)} int32 words, got {bitmask.shape[-1]}")


_BIT = torch.arange(32, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words [..., W] (bit j of word w = token 32*w + j) -> bool [..., vocab_size], on bitmask's device."""
    if bitmask.device.type == "cpu" and sys.byteorder == "little":
        # numpy unpacks bits ~50x faster than shifting 32 planes on the CPU
        raw = bitmask.contiguous().numpy().view(np.uint8)
        bits = torch.from_numpy(np.unpackbits(raw, axis=-1, bitorder="little"))
        return bits.view(torch.bool)[..., :vocab_size]
    shifts = _BIT.to(bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)[..., :vocab_size]


class GrammarMatcher:
    """One request's position in its grammar. Not thread-safe; one per request."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_token_id: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._finished = False

    def fill_bitmask(self, bitmask_row: torch.Tensor) -> None:
        """Allowed next tokens as bits into an int32 CPU row of ceil(vocab_size / 32) words."""
        _check_bitmask(bitmask_row, self.vocab_size)
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


def apply_mask(logits_row: torch.Tensor, matcher: GrammarMatcher) -> torch.Tensor:
    """Sets the logits of tokens the grammar forbids next to -inf, in place (ids at or past the matcher's
    vocab_size too), and returns the row. The bitmask is computed on the CPU and expanded on the row's device."""
    words = torch.empty(bitmask_width(matcher.vocab_size), dtype=torch.int32)
    matcher.fill_bitmask(words)
    apply_bitmask(logits_row, words, matcher.vocab_size)
    return logits_row


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, vocab_size: int) -> None:
    """In place: logits [..., V] (any device) get -inf where the bitmask [..., ceil(vocab_size / 32)] has a 0 bit
    and at every id >= vocab_size. Rows of a batch: logits [R, V] with bitmask [R, W] (see fill_bitmasks)."""
    allowed = bitmask_to_bool(bitmask.to(logits.device, non_blocking=True), vocab_size)
    n = min(vocab_size, logits.shape[-1])
    logits[..., :n].masked_fill_(~allowed[..., :n], float("-inf"))
    logits[..., n:] = float("-inf")
