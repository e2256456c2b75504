"""Preparing a request for the engine: the serving context, the model check, limits, sampling parameters, the
grammar a request asks for, and its response parser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from s1serve.constraints import Constraint, Limits
from s1serve.engine.client import EngineClient
from s1serve.multimodal.chat import MediaPipeline
from s1serve.sampling_params import InvalidParameterError, SamplingParams, check_context_length
from s1serve.serve.openai.errors import APIError
from s1serve.serve.openai.grammars import json_constraint, tool_call_constraint
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

    def token_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is not a single token of this tokenizer")
        return ids[0]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def check_model(ctx: ServingContext, name: str | None) -> None:
    """404 for another model's name; 503 at once while the engine is dead (no stream is started)."""
    if ctx.engine.errored:
        raise APIError(503, f"the engine has stopped: {ctx.engine.error}")
    if name is not None and name != ctx.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{ctx.model_name}'", "model")


def resolve_max_tokens(ctx: ServingContext, prompt_len: int, requested: int | None) -> int:
    try:
        return check_context_length(prompt_len, ctx.max_model_len, requested, prompt_param="messages")
    except InvalidParameterError as exc:
        raise APIError(400, str(exc), exc.param) from None


def sampling_params(
    req: SamplingFields, max_tokens: int, logprobs: int | None, constraint: Constraint | None = None
) -> SamplingParams:
    """Engine parameters. Stop strings stay with the server, which applies them to the content only."""
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
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            constraint=constraint,
        )
    except InvalidParameterError as exc:
        raise APIError(400, str(exc), exc.param) from None


def response_parser(ctx: ServingContext, starts_in_reasoning: bool, tools: set[str] | None, parallel: bool) -> ResponseParser:
    reasoning = ctx.reasoning_parser(starts_in_reasoning) if ctx.reasoning_parser else None
    calls = ctx.tool_parser(tools, parallel) if ctx.tool_parser and tools is not None else None
    return ResponseParser(reasoning, calls)


def chat_constraint(req: ChatCompletionRequest, opens_reasoning: bool, max_tokens: int) -> Constraint | None:
    """The grammar that enforces tool_choice required / named and response_format, if the request asks for one."""
    limits = Limits.for_max_tokens(max_tokens)
    if req.tools and req.tool_choice == "required":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        return tool_call_constraint(tools, None, req.parallel_tool_calls, opens_reasoning, limits)
    if req.tools and isinstance(req.tool_choice, NamedToolChoice):
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        return tool_call_constraint(tools, [req.tool_choice.function.name], False, opens_reasoning, limits)
    if req.response_format is not None and req.response_format.type != "text":
        schema = req.response_format.json_schema["schema"] if req.response_format.type == "json_schema" else None
        return json_constraint(schema, opens_reasoning, limits)
    return None
