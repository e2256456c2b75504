"""Preparing a request for the engine: the serving context, the model check, limits, sampling parameters, the
grammar a request asks for, and its response parser."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from s1serve.constraints import Constraint, Limits, StructuredOutputError
from s1serve.engine.admission import RETRY_AFTER_S, QueueFullError
from s1serve.engine.client import EngineClient
from s1serve.engine.faults import FaultPlan
from s1serve.multimodal.chat import MediaPipeline
from s1serve.sampling_params import InvalidParameterError, SamplingParams, check_context_length, check_token_ids
from s1serve.serve.openai.errors import APIError
from s1serve.serve.openai.grammars import json_constraint, reasoning_budget_constraint, tool_call_constraint
from s1serve.serve.openai.metrics import ServerMetrics
from s1serve.serve.openai.protocol import ChatCompletionRequest, NamedToolChoice, SamplingFields
from s1serve.serve.parsers.reasoning import ReasoningParser
from s1serve.serve.parsers.response import ResponseParser
from s1serve.serve.parsers.tool_calls import ToolCallParser


@dataclass
class ServingContext:
    engine: EngineClient
    tokenizer: Any  # s1serve.tokenizer.Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    metrics: ServerMetrics
    reasoning_parser: type[ReasoningParser] | None
    tool_parser: type[ToolCallParser] | None
    media: MediaPipeline | None = None  # None: the checkpoint takes text only
    request_timeout: float | None = None  # --request-timeout: seconds an engine request may take (None: no limit)
    faults: FaultPlan | None = None  # test-only fault injection (engine/faults.py)

    def token_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is not a single token of this tokenizer")
        return ids[0]

    def token_text(self, token_id: int) -> str:
        """A token's text for logprobs. Ids past the tokenizer's table (the lm_head's padding rows: 155008 rows
        for 154766 tokens) are valid model outputs with no text, as the engine's text output treats them."""
        if token_id >= self.tokenizer.vocab_size:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def render_chat_prompt(
    tokenizer: Any, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool, kwargs: dict | None
) -> str:
    """The chat template applied to a request's messages; a template error, or chat_template_kwargs that clash with
    the template's own arguments (`messages`, `tools`), is the request's fault (400)."""
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **(kwargs or {})
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise APIError(400, f"messages cannot be rendered with the chat template: {exc}", "messages") from None


def check_model(ctx: ServingContext, name: str | None) -> None:
    """404 for another model's name; 503 at once while the engine is dead (no stream is started)."""
    if ctx.engine.errored:
        raise APIError(503, f"the engine has stopped: {ctx.engine.error}")
    if name is not None and name != ctx.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{ctx.model_name}'", "model")


def busy_error(exc: QueueFullError) -> APIError:
    """The 429 of a request refused by admission control, with the Retry-After clients honour."""
    return APIError(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)})


def check_capacity(ctx: ServingContext) -> None:
    """429 at once, before any work on the request, when this server's open requests fill the engine's limits."""
    try:
        ctx.engine.check_admission()
    except QueueFullError as exc:
        raise busy_error(exc) from None


def resolve_max_tokens(ctx: ServingContext, prompt_len: int, requested: int | None) -> int:
    try:
        return check_context_length(prompt_len, ctx.max_model_len, requested, prompt_param="messages")
    except InvalidParameterError as exc:
        raise APIError(400, str(exc), exc.param) from None


def logit_bias(req: SamplingFields, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """The request's logit_bias with its JSON keys read as token ids of this vocabulary."""
    pairs = []
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        try:
            check_token_ids([token], vocab_size, "logit_bias", "logit_bias token id")
        except InvalidParameterError as exc:
            raise APIError(400, str(exc), exc.param) from None
        pairs.append((token, value))
    return tuple(pairs)


def sampling_params(
    req: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    constraint: Constraint | None = None,
    *,
    vocab_size: int,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """Engine parameters. Stop strings stay with the server, which applies them to the content only.
    `prompt_logprobs`: what the engine computes (req.prompt_logprobs, or more for a completions echo)."""
    try:
        return SamplingParams(
            n=req.n,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            constraint=constraint,
            logit_bias=logit_bias(req, vocab_size),
        )
    except InvalidParameterError as exc:
        raise APIError(400, str(exc), exc.param) from None


def response_parser(ctx: ServingContext, starts_in_reasoning: bool, tools: set[str] | None, parallel: bool) -> ResponseParser:
    reasoning = ctx.reasoning_parser(starts_in_reasoning) if ctx.reasoning_parser else None
    calls = ctx.tool_parser(tools, parallel) if ctx.tool_parser and tools is not None else None
    return ResponseParser(reasoning, calls)


def chat_constraint(
    req: ChatCompletionRequest, opens_reasoning: bool, max_tokens: int, reasoning_budget: int | None = None
) -> Constraint | None:
    """The grammar that enforces tool_choice required / named, response_format and a reasoning budget (at most
    that many reasoning tokens, then `</think>`), if the request asks for one; tools or a schema no grammar can be
    built from are the request's fault (400 naming the field)."""
    limits = Limits.for_max_tokens(max_tokens)
    if reasoning_budget is not None:
        limits = replace(limits, reasoning_tokens=reasoning_budget)
    field = "tools"
    try:
        if req.tools and req.tool_choice == "required":
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            return tool_call_constraint(tools, None, req.parallel_tool_calls, opens_reasoning, limits)
        if req.tools and isinstance(req.tool_choice, NamedToolChoice):
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            return tool_call_constraint(tools, [req.tool_choice.function.name], False, opens_reasoning, limits)
        field = "response_format"
        if req.response_format is not None and req.response_format.type != "text":
            schema = req.response_format.json_schema["schema"] if req.response_format.type == "json_schema" else None
            return json_constraint(schema, opens_reasoning, limits)
    except StructuredOutputError as exc:
        raise APIError(400, str(exc), field) from None
    if reasoning_budget is not None and opens_reasoning:
        return reasoning_budget_constraint(limits)
    return None
