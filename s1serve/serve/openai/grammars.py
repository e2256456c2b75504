"""OpenAI `tool_choice` required / named and `response_format` json_object / json_schema as grammars.

A constraint is llguidance's Lark dialect with inline JSON Schemas, compiled and enforced by the engine
(engine/structured_output.py). What the grammar accepts, in order:
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
from collections.abc import Mapping, Sequence
from typing import Any

from s1serve.constraints import Constraint, Limits, StructuredOutputError

THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# Inside <tool_call> ... </tool_call>, exactly as the chat template renders a call.
_CALL_HEAD = '\n{"name": '
_CALL_TAIL = "}\n"
# JSON as the chat template's `tojson` writes it (Python json.dumps separators).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
_ANY_DEF = "s1serve_any"

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
