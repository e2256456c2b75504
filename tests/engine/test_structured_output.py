"""Constrained decoding with the real tokenizer files: a "random model" (a uniformly random allowed token at every
step, seeded) must end with valid tool calls / JSON, in the chat template's format, within its token budget."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

from s1serve.assets import ASSETS_DIR
from s1serve.config import load_model_config
from s1serve.constraints import Constraint, Limits, StructuredOutputError
from s1serve.engine.grammar import apply_bitmask, bitmask_width
from s1serve.engine.structured_output import GrammarCompiler, GrammarViolationError
from s1serve.serve.openai.grammars import (
    bound_schema,
    json_constraint,
    reasoning_budget_constraint,
    tool_call_constraint,
)
from s1serve.tokenizer import load_tokenizer
from weather_tools import WEATHER_TOOLS

PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER_TOOLS}
BUDGET = 200  # max_tokens of the random-model runs
SEEDS = range(6)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS_DIR)


@pytest.fixture(scope="module")
def vocab_size() -> int:
    return load_model_config(ASSETS_DIR).text.vocab_size


@pytest.fixture(scope="module")
def compiler(tokenizer, vocab_size) -> GrammarCompiler:
    return GrammarCompiler.from_tokenizer(tokenizer, vocab_size)


@pytest.fixture(scope="module")
def ids(tokenizer) -> dict[str, int]:
    names = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<|im_end|>", "<|im_start|>", "<|endoftext|>"]
    return {n: tokenizer.token_to_id(n) for n in names}


def random_run(compiler: GrammarCompiler, constraint: Constraint, seed: int, limit: int = 2000) -> list[int]:
    """Ids a random model emits under the constraint: at each step a uniformly random allowed token."""
    matcher = compiler.matcher(constraint)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while not matcher.is_finished():
        assert len(out) < limit, "the constrained output did not end"
        allowed = matcher.allowed_token_mask().nonzero().flatten()
        token = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
        matcher.accept(token)
        out.append(token)
    return out


def text_of(tokenizer, token_ids: list[int]) -> str:
    """The bytes of the ids before the end-of-sequence token, as UTF-8 (what the detokenizer shows)."""
    assert token_ids[-1] == tokenizer.eos_token_ids[0]
    raw = b"".join(tokenizer.token_bytes()[i] for i in token_ids[:-1])
    text = raw.decode("utf-8")  # strict: a constrained output is whole characters
    assert tokenizer.decode(token_ids[:-1], skip_special_tokens=True, spaces_between_special_tokens=False) == text
    return text


CALL = re.compile(r'<tool_call>\n(\{"name": .*?\})\n</tool_call>', re.S)


def parse_calls(text: str) -> list[dict[str, Any]]:
    """Tool-call blocks exactly as the chat template writes them, one per line and nothing else."""
    blocks = text.split("\n<tool_call>")
    blocks = [blocks[0]] + ["<tool_call>" + b for b in blocks[1:]]
    calls = []
    for block in blocks:
        match = CALL.fullmatch(block)
        assert match, f"not a tool-call block: {block!r}"
        call = json.loads(match.group(1))
        assert list(call) == ["name", "arguments"]
        assert match.group(1) == json.dumps(call, ensure_ascii=False)  # compact, tojson separators
        calls.append(call)
    return calls


def check(value: Any, schema: dict[str, Any], path: str = "$") -> None:
    """A small JSON Schema check for what these tests use: type, enum, properties, required,
    additionalProperties false, items, maxLength."""
    kinds = {"object": dict, "string": str, "array": list, "integer": int, "boolean": bool, "null": type(None)}
    if "type" in schema:
        assert isinstance(value, kinds[schema["type"]]), f"{path}: {value!r} is not {schema['type']}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "maxLength" in schema:
        assert len(value) <= schema["maxLength"], path
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: required {key!r} missing from {value!r}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for key, item in value.items():
            if key in props:
                check(item, props[key], f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            check(item, schema["items"], f"{path}[{i}]")


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "additionalProperties": False}


def split_reasoning(token_ids: list[int], ids: dict[str, int]) -> tuple[list[int], list[int]]:
    """(reasoning ids, ids after </think>), checking </think> comes exactly once."""
    assert token_ids.count(ids["</think>"]) == 1
    k = token_ids.index(ids["</think>"])
    return token_ids[:k], token_ids[k + 1 :]


# ---- tool calls ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("budget", "seed"), [(BUDGET, s) for s in SEEDS] + [(512, 0), (512, 1)])
def test_required_random_model_calls_a_declared_tool_after_reasoning(compiler, tokenizer, ids, budget, seed):
    limits = Limits.for_max_tokens(budget)
    constraint = tool_call_constraint(WEATHER_TOOLS, None, parallel=True, starts_in_reasoning=True, limits=limits)
    out = random_run(compiler, constraint, seed)
    assert len(out) <= budget
    reasoning, answer = split_reasoning(out, ids)
    assert len(reasoning) <= limits.reasoning_tokens
    assert "</think>" not in text_of(tokenizer, reasoning + [out[-1]])
    text = text_of(tokenizer, out)
    answer_text = text.split("</think>", 1)[1]
    assert re.fullmatch(r"\n{0,2}", answer_text[: answer_text.index("<tool_call>")])
    calls = parse_calls(answer_text.lstrip("\n"))
    assert len(calls) <= limits.max_calls
    # the tags are the single added tokens, never spelled out of pieces
    assert answer.count(ids["<tool_call>"]) == answer.count(ids["</tool_call>"]) == len(calls)
    for call in calls:
        assert call["name"] in PARAMS
        check(call["arguments"], strict(PARAMS[call["name"]]))


@pytest.mark.parametrize("seed", SEEDS)
def test_required_without_thinking_starts_with_the_call(compiler, tokenizer, ids, seed):
    constraint = tool_call_constraint(WEATHER_TOOLS, None, parallel=False, starts_in_reasoning=False,
                                      limits=Limits.for_max_tokens(100))
    out = random_run(compiler, constraint, seed)
    assert len(out) <= 100
    assert out[0] == ids["<tool_call>"] and ids["</think>"] not in out
    calls = parse_calls(text_of(tokenizer, out))
    assert len(calls) == 1
    check(calls[0]["arguments"], strict(PARAMS[calls[0]["name"]]))


def test_parallel_false_gives_exactly_one_call_and_true_allows_several(compiler, tokenizer):
    limits = Limits(reasoning_tokens=0, string_length=8, max_calls=4)
    one = tool_call_constraint(WEATHER_TOOLS, None, parallel=False, starts_in_reasoning=True, limits=limits)
    many = tool_call_constraint(WEATHER_TOOLS, None, parallel=True, starts_in_reasoning=True, limits=limits)

    def count(constraint: Constraint, seed: int) -> int:
        text = text_of(tokenizer, random_run(compiler, constraint, seed))
        return len(parse_calls(text.split("</think>")[1].lstrip("\n")))

    counts_one = [count(one, seed) for seed in range(8)]
    counts_many = [count(many, seed) for seed in range(8)]
    assert counts_one == [1] * 8
    assert max(counts_many) > 1 and max(counts_many) <= 4


@pytest.mark.parametrize("seed", range(4))
def test_named_function_is_the_only_one_called(compiler, tokenizer, seed):
    constraint = tool_call_constraint(WEATHER_TOOLS, ["get_temperature_date"], parallel=False, starts_in_reasoning=True,
                                      limits=Limits.for_max_tokens(BUDGET))
    out = random_run(compiler, constraint, seed)
    assert len(out) <= BUDGET
    (call,) = parse_calls(text_of(tokenizer, out).split("</think>")[1].lstrip("\n"))
    assert call["name"] == "get_temperature_date"
    check(call["arguments"], strict(PARAMS["get_temperature_date"]))
    assert {"location", "date"} <= set(call["arguments"])


def test_tool_without_parameters_gets_empty_arguments(compiler, tokenizer):
    tools = [{"type": "function", "function": {"name": "ping"}}]
    constraint = tool_call_constraint(tools, None, parallel=False, starts_in_reasoning=False)
    (call,) = parse_calls(text_of(tokenizer, random_run(compiler, constraint, 0)))
    assert call == {"name": "ping", "arguments": {}}


# ---- reasoning bound ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 1, 12])
def test_reasoning_is_bounded_in_tokens(compiler, ids, budget):
    constraint = tool_call_constraint(WEATHER_TOOLS, None, parallel=False, starts_in_reasoning=True,
                                      limits=Limits(reasoning_tokens=budget, string_length=8))
    for seed in range(3):
        reasoning, _ = split_reasoning(random_run(compiler, constraint, seed), ids)
        assert len(reasoning) <= budget
    if budget == 0:  # closed at once: </think> is the only allowed first token
        first = compiler.matcher(constraint).allowed_token_mask()
        assert first.nonzero().flatten().tolist() == [ids["</think>"]]


def test_reasoning_allows_text_but_no_added_token_and_no_spelled_think_end(compiler, tokenizer, ids, vocab_size):
    matcher = compiler.matcher(json_constraint(None, starts_in_reasoning=True, limits=Limits.for_max_tokens(BUDGET)))
    allowed = matcher.allowed_token_mask()
    assert allowed.shape == (vocab_size,) and allowed.dtype == torch.bool
    assert allowed[ids["</think>"]]
    for name in ("<think>", "<tool_call>", "</tool_call>", "<|im_end|>", "<|im_start|>", "<|endoftext|>"):
        assert not allowed[ids[name]], name
    assert not allowed[tokenizer.vocab_size :].any()  # ids with no bytes
    assert allowed.sum() > 150_000  # free text: nearly the whole byte-level vocabulary
    # "</think>" spelled in pieces may start but never finish
    pieces = tokenizer.encode("a </think")
    for token in pieces:
        matcher.accept(token)
    after = matcher.allowed_token_mask()
    assert not after[tokenizer.encode(">")[0]]
    assert after[tokenizer.encode("s")[0]] and after[ids["</think>"]]


# ---- response_format ----------------------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "address"],
}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("thinking", [True, False])
def test_json_schema_output_validates(compiler, tokenizer, ids, seed, thinking):
    limits = Limits(reasoning_tokens=16, string_length=16)
    out = random_run(compiler, json_constraint(PERSON, starts_in_reasoning=thinking, limits=limits), seed)
    text = text_of(tokenizer, out)
    if thinking:
        split_reasoning(out, ids)
        text = text.split("</think>", 1)[1].lstrip("\n")
    else:
        assert ids["</think>"] not in out
    value = json.loads(text)
    check(value, {**PERSON, "additionalProperties": False,
                  "properties": {**PERSON["properties"], "address": strict(PERSON["properties"]["address"])}})
    assert len(value["name"]) <= 16


@pytest.mark.parametrize("seed", range(6))
def test_json_object_output_is_an_object(compiler, tokenizer, ids, seed):
    constraint = json_constraint(None, starts_in_reasoning=True, limits=Limits.for_max_tokens(BUDGET))
    out = random_run(compiler, constraint, seed)
    split_reasoning(out, ids)
    value = json.loads(text_of(tokenizer, out).split("</think>", 1)[1].lstrip("\n"))
    assert isinstance(value, dict)


# ---- mask and matcher ---------------------------------------------------------------------------------------


def test_mask_agrees_with_the_matcher(compiler, tokenizer, vocab_size):
    """Along one random run: sampled allowed tokens are accepted, sampled disallowed ones are refused."""
    constraint = tool_call_constraint(WEATHER_TOOLS, None, parallel=True, starts_in_reasoning=True,
                                      limits=Limits(reasoning_tokens=3, string_length=12, max_calls=2))
    matcher = compiler.matcher(constraint)
    gen = torch.Generator().manual_seed(7)
    steps = 0
    while not matcher.is_finished():
        mask = matcher.allowed_token_mask()
        allowed, refused = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        for pool, ok in ((allowed, True), (refused, False)):
            picks = pool[torch.randperm(len(pool), generator=gen)[:20]].tolist() if len(pool) else []
            for token in picks:
                twin = matcher.fork()
                if ok:
                    twin.accept(token)
                else:
                    with pytest.raises(GrammarViolationError):
                        twin.accept(token)
        matcher.accept(int(allowed[torch.randint(len(allowed), (1,), generator=gen)]))
        steps += 1
    assert steps > 20
    with pytest.raises(GrammarViolationError):
        matcher.accept(tokenizer.eos_token_ids[0])  # nothing after the end


def test_end_of_sequence_is_the_only_token_after_a_complete_call(compiler, tokenizer, ids):
    constraint = tool_call_constraint(WEATHER_TOOLS, ["get_current_temperature"], parallel=False,
                                      starts_in_reasoning=False)
    matcher = compiler.matcher(constraint)
    assert not matcher.is_accepting()
    with pytest.raises(GrammarViolationError):
        matcher.accept(ids["<|im_end|>"])  # no empty answer
    matcher = compiler.matcher(constraint)
    text = '\n{"name": "get_current_temperature", "arguments": {"location": "Paris"}}\n'
    for token in [ids["<tool_call>"], *tokenizer.encode(text), ids["</tool_call>"]]:
        matcher.accept(token)
    assert matcher.is_accepting() and not matcher.is_finished()
    assert matcher.allowed_token_mask().nonzero().flatten().tolist() == [ids["<|im_end|>"]]
    matcher.accept(ids["<|im_end|>"])
    assert matcher.is_finished()


def test_spelled_tags_and_other_whitespace_are_refused(compiler, tokenizer, ids):
    constraint = tool_call_constraint(WEATHER_TOOLS, None, parallel=True, starts_in_reasoning=False)
    matcher = compiler.matcher(constraint)
    with pytest.raises(GrammarViolationError):
        matcher.accept(tokenizer.encode("<")[0])  # "<tool_call>" only as the added token
    matcher.accept(ids["<tool_call>"])
    for token in tokenizer.encode('\n{"name": "get_current_temperature", "arguments": {"location":'):
        matcher.accept(token)
    with pytest.raises(GrammarViolationError):
        matcher.fork().accept(tokenizer.encode('"')[0])  # ": " is the separator, as tojson writes it
    matcher.accept(tokenizer.encode(" ")[0])
    with pytest.raises(GrammarViolationError):
        matcher.accept(ids["<|im_start|>"])  # no added token inside JSON


def apply_mask(compiler: GrammarCompiler, logits: torch.Tensor, matcher: Any) -> None:
    """What the engine does for a batch of one: the matcher's bitmask, then -inf where it forbids."""
    words = torch.empty(1, bitmask_width(compiler.vocab_size), dtype=torch.int32)
    compiler.fill_bitmasks([(matcher, 0)], words)
    apply_bitmask(logits, words[0], compiler.vocab_size)


def test_apply_mask_sets_forbidden_logits_to_minus_infinity(compiler, vocab_size, ids):
    constraint = tool_call_constraint(WEATHER_TOOLS, None, parallel=False, starts_in_reasoning=False)
    matcher = compiler.matcher(constraint)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab_size + 16, generator=gen)  # wider than the grammar's vocabulary
    original = logits.clone()
    apply_mask(compiler, logits, matcher)
    finite = torch.isfinite(logits).nonzero().flatten().tolist()
    assert finite == [ids["<tool_call>"]]
    assert logits[ids["<tool_call>"]] == original[ids["<tool_call>"]]

    reasoning = compiler.matcher(tool_call_constraint(WEATHER_TOOLS, starts_in_reasoning=True))
    row = torch.randn(vocab_size, generator=gen)
    apply_mask(compiler, row, reasoning)
    assert torch.equal(torch.isfinite(row), reasoning.allowed_token_mask())


def test_batched_bitmasks_match_single_masks(compiler, vocab_size):
    constraints = [
        tool_call_constraint(WEATHER_TOOLS, starts_in_reasoning=True),
        tool_call_constraint(WEATHER_TOOLS, starts_in_reasoning=False),
        json_constraint(PERSON, starts_in_reasoning=False),
    ]
    matchers = [compiler.matcher(c) for c in constraints]
    bitmask = torch.zeros(4, bitmask_width(vocab_size), dtype=torch.int32)
    compiler.fill_bitmasks([(m, row) for row, m in zip((3, 0, 1), matchers)], bitmask)
    for row, m in zip((3, 0, 1), matchers):
        logits = torch.zeros(vocab_size)
        apply_bitmask(logits, bitmask[row], vocab_size)
        assert torch.equal(torch.isfinite(logits), m.allowed_token_mask())
    assert not bitmask[2].any()  # untouched row
    logits = torch.zeros(4, vocab_size)
    apply_bitmask(logits, bitmask, vocab_size)
    assert torch.equal(torch.isfinite(logits[0]), matchers[1].allowed_token_mask())


def test_fill_mask_writes_a_bool_row(compiler, vocab_size):
    matcher = compiler.matcher(json_constraint(None, starts_in_reasoning=False))
    row = torch.ones(vocab_size + 8, dtype=torch.bool)
    matcher.fill_mask(row)
    assert not row[vocab_size:].any()
    assert torch.equal(row[:vocab_size], matcher.allowed_token_mask())
    assert row.sum() < 100  # '{' and the few tokens starting with it


def test_compiled_grammar_is_cached_and_matchers_are_independent(compiler, tokenizer, ids):
    a = tool_call_constraint(WEATHER_TOOLS, None, parallel=False, starts_in_reasoning=False)
    b = tool_call_constraint(json.loads(json.dumps(WEATHER_TOOLS)), None, parallel=False, starts_in_reasoning=False)
    assert a == b and hash(a) == hash(b)
    first, second = compiler.matcher(a), compiler.matcher(b)
    first.accept(ids["<tool_call>"])
    assert second.allowed_token_mask().nonzero().flatten().tolist() == [ids["<tool_call>"]]
    assert not first.allowed_token_mask()[ids["<tool_call>"]]


# ---- building constraints -----------------------------------------------------------------------------------


def test_bad_requests_raise_structured_output_errors(compiler):
    with pytest.raises(StructuredOutputError, match="not among the tools"):
        tool_call_constraint(WEATHER_TOOLS, ["get_weather"])
    with pytest.raises(StructuredOutputError, match="at least one tool"):
        tool_call_constraint([])
    with pytest.raises(StructuredOutputError, match="declared twice"):
        tool_call_constraint(WEATHER_TOOLS + WEATHER_TOOLS[:1])
    with pytest.raises(StructuredOutputError, match="no function name"):
        tool_call_constraint([{"type": "function", "function": {"parameters": {}}}])
    with pytest.raises(StructuredOutputError, match="list of function names"):
        tool_call_constraint(WEATHER_TOOLS, "get_current_temperature")
    with pytest.raises(StructuredOutputError, match="JSON Schema"):
        json_constraint([1, 2])  # type: ignore[arg-type]
    with pytest.raises(StructuredOutputError):
        compiler.validate(json_constraint({"type": "object", "properties": {"a": {"type": "strnig"}}}))
    with pytest.raises(StructuredOutputError):
        Limits(reasoning_tokens=-1)
    with pytest.raises(StructuredOutputError):
        Limits(max_calls=0)


def test_limits_scale_with_max_tokens():
    small, large = Limits.for_max_tokens(64), Limits.for_max_tokens(32768)
    assert small == Limits(reasoning_tokens=0, string_length=16, max_calls=1)
    assert large == Limits(reasoning_tokens=(32768 - 64) // 2, string_length=4096, max_calls=128)
    assert Limits.for_max_tokens(200) == Limits(reasoning_tokens=68, string_length=25, max_calls=1)
    with pytest.raises(StructuredOutputError):
        Limits.for_max_tokens(0)


def test_bound_schema_rules():
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "short": {"type": "string", "maxLength": 3},
            "long_min": {"type": "string", "minLength": 40},
            "e": {"type": "string", "enum": ["a" * 50]},
            "free": {},
            "map": {"type": "object", "additionalProperties": {"type": "integer"}},
            "open": {"type": "object", "properties": {"x": {"type": "integer"}}, "additionalProperties": True},
        },
    }
    out = bound_schema(schema, 10)
    props = out["properties"]
    assert out["additionalProperties"] is False
    assert props["s"]["maxLength"] == 10 and props["short"]["maxLength"] == 3 and props["long_min"]["maxLength"] == 40
    assert "maxLength" not in props["e"]
    assert props["free"] == {"$ref": "#/$defs/s1serve_any"} and "s1serve_any" in out["$defs"]
    assert props["map"]["patternProperties"] == {"^(?s:.{0,10})$": {"type": "integer"}}
    assert props["map"]["additionalProperties"] is False and props["open"]["additionalProperties"] is False
    assert schema["properties"]["s"] == {"type": "string"}  # the input is not modified
    unbounded = bound_schema(schema, None)
    assert "maxLength" not in unbounded["properties"]["s"] and unbounded["additionalProperties"] is False
    assert unbounded["properties"]["open"]["additionalProperties"] is True  # an explicit choice is kept


@pytest.mark.parametrize("budget", [0, 3, 9])
def test_reasoning_budget_closes_the_thinking_in_time_and_leaves_the_answer_free(compiler, ids, budget):
    constraint = reasoning_budget_constraint(Limits(reasoning_tokens=budget))
    matcher = compiler.matcher(constraint)
    gen = torch.Generator().manual_seed(budget)
    out: list[int] = []
    while ids["</think>"] not in out:
        assert len(out) <= budget, "the thinking ran past its budget"
        allowed = matcher.allowed_token_mask().nonzero().flatten()
        token = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
        matcher.accept(token)
        out.append(token)
    assert out.count(ids["<tool_call>"]) == 0  # the thinking cannot call; the answer can:
    allowed = matcher.allowed_token_mask()
    assert allowed[ids["<tool_call>"]] and allowed[ids["</tool_call>"]] and allowed[ids["<|im_end|>"]]
    assert allowed.sum() > 100_000  # free text after the thinking
    with pytest.raises(StructuredOutputError, match="reasoning_tokens"):
        reasoning_budget_constraint(Limits())
