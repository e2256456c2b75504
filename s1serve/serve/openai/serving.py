"""Chat and text completions over the AsyncEngine: prompt building, limits, parsed choices, SSE streaming."""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

from fastapi.responses import JSONResponse, StreamingResponse

from s1serve.engine.async_engine import AsyncEngine, EngineDeadError
from s1serve.engine.structured_output import (
    Constraint, Limits, json_constraint, reasoning_budget_constraint, tool_call_constraint,
)
from s1serve.layers.sampler import TokenLogprob
from s1serve.sampling_params import InvalidParameterError, SamplingParams
from s1serve.serve.openai.choice import ChoiceText
from s1serve.serve.openai.errors import APIError, error_body
from s1serve.serve.openai.metrics import ServerMetrics
from s1serve.serve.openai.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice, SamplingFields, random_id
from s1serve.serve.parsers.reasoning import ReasoningParser, count_reasoning_tokens, prompt_opens_reasoning
from s1serve.serve.parsers.response import ResponseDelta, ResponseParser
from s1serve.serve.parsers.tool_calls import ToolCallParser


@dataclass
class ServingContext:
    engine: AsyncEngine
    tokenizer: Any  # s1serve.tokenizer.Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int
    metrics: ServerMetrics
    reasoning_parser: type[ReasoningParser] | None
    tool_parser: type[ToolCallParser] | None

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
    if prompt_len >= ctx.max_model_len:
        raise APIError(
            400, f"This model's maximum context length is {ctx.max_model_len} tokens; the prompt has {prompt_len}", "messages"
        )
    room = ctx.max_model_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx.max_model_len} tokens; the request has {prompt_len} prompt "
            f"tokens and asks for max_tokens {requested} ({prompt_len} + {requested} > {ctx.max_model_len})",
            "max_tokens",
        )
    return requested


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


@dataclass
class ChoiceStep:
    index: int
    delta: ResponseDelta
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # the choice's final reason (tool_calls / stop / length / abort) on its last step


@dataclass
class Generation:
    """One engine request (all n choices of one prompt) turned into parsed choice steps."""

    ctx: ServingContext
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    choices: list[ChoiceText]
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.choices)
        self.token_ids = [[] for _ in range(n)]
        self.logprobs = [[] for _ in range(n)]
        self.finish_reasons = [None] * n

    async def steps(self) -> AsyncIterator[ChoiceStep]:
        metrics = self.ctx.metrics
        start = time.monotonic()
        first_token_at = None
        agen = self.ctx.engine.generate(self.prompt_ids, self.params, self.request_id)
        try:
            async for out in agen:
                i = out.index
                if self.finish_reasons[i] is not None:
                    continue  # ended by a stop string while the engine still ran it (n > 1)
                choice = self.choices[i]
                if out.token_ids and first_token_at is None:
                    first_token_at = time.monotonic()
                    metrics.ttft.observe(first_token_at - start)
                self.token_ids[i] += out.token_ids
                self.logprobs[i] += out.logprobs or []
                delta = choice.push(out.text)
                reason = "stop" if choice.stopped else out.finish_reason
                if reason is not None:
                    delta = delta.then(choice.finish())
                    reason = choice.parser.finish_reason(reason)
                    self.finish_reasons[i] = reason
                yield ChoiceStep(i, delta, out.token_ids, out.logprobs, reason)
                if all(r is not None for r in self.finish_reasons):
                    break
        except InvalidParameterError as exc:
            raise APIError(400, str(exc), exc.param) from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from None
        finally:
            await agen.aclose()  # aborts the engine request if it is still running
            generated = sum(map(len, self.token_ids))
            metrics.prompt_tokens.inc(len(self.prompt_ids))
            metrics.generation_tokens.inc(generated)
            elapsed = time.monotonic() - start
            metrics.e2e.observe(elapsed)
            if first_token_at is not None and generated > len(self.choices):
                metrics.tpot.observe((time.monotonic() - first_token_at) / (generated - len(self.choices)))

    async def run(self) -> None:
        async for _ in self.steps():
            pass


def _parser(ctx: ServingContext, starts_in_reasoning: bool, tools: set[str] | None, parallel: bool) -> ResponseParser:
    reasoning = ctx.reasoning_parser(starts_in_reasoning) if ctx.reasoning_parser else None
    calls = ctx.tool_parser(tools, parallel) if ctx.tool_parser and tools is not None else None
    return ResponseParser(reasoning, calls)


def _usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None) -> dict:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


async def _sse_stream(
    metrics: ServerMetrics, endpoint: str, base: dict, chunks: AsyncIterator[dict], usage: Callable[[], dict] | None
) -> AsyncIterator[str]:
    """The events of one streamed response: its chunks, an error event if it fails midway, the usage chunk when asked
    for, then [DONE]; the outcome is counted in the request metrics."""
    outcome = "ok"
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield _sse(chunk)
    except APIError as exc:
        outcome = "error"
        yield _sse(error_body(exc.status, exc.message, exc.param))
    finally:
        metrics.requests.labels(endpoint, outcome).inc()
    if usage is not None:
        yield _sse({**base, "choices": [], "usage": usage()})
    yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _delta_json(delta: ResponseDelta) -> dict:
    out: dict[str, Any] = {}
    if delta.reasoning_content:
        out["reasoning_content"] = delta.reasoning_content
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        calls = []
        for call in delta.tool_calls:
            item: dict[str, Any] = {"index": call.index, "function": {"arguments": call.arguments}}
            if call.id is not None:
                item.update(id=call.id, type="function")
                item["function"]["name"] = call.name
            calls.append(item)
        out["tool_calls"] = calls
    return out


def chat_constraint(
    req: ChatCompletionRequest, opens_reasoning: bool, max_tokens: int, reasoning_budget: int | None = None
) -> Constraint | None:
    """The grammar that enforces tool_choice required / named, response_format and a reasoning budget (at most
    that many reasoning tokens, then `</think>`), if the request asks for one."""
    limits = Limits.for_max_tokens(max_tokens)
    if reasoning_budget is not None:
        limits = replace(limits, reasoning_tokens=reasoning_budget)
    if req.tools and req.tool_choice == "required":
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        return tool_call_constraint(tools, None, req.parallel_tool_calls, opens_reasoning, limits)
    if req.tools and isinstance(req.tool_choice, NamedToolChoice):
        tools = [t.model_dump(exclude_none=True) for t in req.tools]
        return tool_call_constraint(tools, [req.tool_choice.function.name], False, opens_reasoning, limits)
    if req.response_format is not None and req.response_format.type != "text":
        schema = req.response_format.json_schema["schema"] if req.response_format.type == "json_schema" else None
        return json_constraint(schema, opens_reasoning, limits)
    if reasoning_budget is not None and opens_reasoning:
        return reasoning_budget_constraint(limits)
    return None


@dataclass
class PreparedChat:
    gen: Generation
    reasoning_ids: dict | None  # count_reasoning_tokens' arguments, None without a reasoning parser
    usage: Callable[[], dict]  # the chat usage object of the generation so far


class ChatServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def render(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
        try:
            prompt = self.ctx.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=req.add_generation_prompt, **(req.chat_template_kwargs or {})
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise APIError(400, f"messages cannot be rendered with the chat template: {exc}", "messages") from None
        return prompt, self.ctx.tokenizer.encode(prompt)

    def _logprobs(self, entries: list[TokenLogprob]) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text = self.ctx.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}

    def prepare(self, req: ChatCompletionRequest, reasoning_budget: int | None = None) -> PreparedChat:
        """Render, limits, sampling parameters, constraint and parsers of a chat request, ready to run. The
        Responses and Messages APIs translate their requests into a chat request and run it through here too."""
        ctx = self.ctx
        check_model(ctx, req.model)
        prompt, prompt_ids = self.render(req)
        max_tokens = resolve_max_tokens(ctx, len(prompt_ids), req.max_new_tokens)
        opens_reasoning = prompt_opens_reasoning(prompt)
        starts_in_reasoning = ctx.reasoning_parser is not None and opens_reasoning
        tool_names = None
        if req.tools and req.tool_choice != "none":
            tool_names = {t.function.name for t in req.tools}
            if isinstance(req.tool_choice, NamedToolChoice):
                tool_names = {req.tool_choice.function.name}
        constraint = chat_constraint(req, opens_reasoning, max_tokens, reasoning_budget)
        params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, constraint)
        choices = [
            ChoiceText.create(_parser(ctx, starts_in_reasoning, tool_names, req.parallel_tool_calls), req.stop, req.include_stop_str_in_output)
            for _ in range(req.n)
        ]
        gen = Generation(ctx, random_id("chatcmpl-"), prompt_ids, params, choices)
        reasoning_ids = None
        if ctx.reasoning_parser is not None:
            reasoning_ids = dict(
                starts_in_reasoning=starts_in_reasoning,
                think_start_id=ctx.token_id("<think>"),
                think_end_id=ctx.token_id("</think>"),
                tool_call_start_id=ctx.token_id("<tool_call>") if tool_names is not None else None,
            )
        return PreparedChat(gen, reasoning_ids, lambda: self._usage(gen, reasoning_ids))

    async def create(self, req: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        ctx = self.ctx
        prepared = self.prepare(req)
        gen, choices, reasoning_ids = prepared.gen, prepared.gen.choices, prepared.reasoning_ids
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(gen, include_usage, reasoning_ids, req.logprobs), media_type="text/event-stream")
        await gen.run()
        ctx.metrics.requests.labels("chat", "ok").inc()
        body_choices = []
        for i, choice in enumerate(choices):
            parsed = choice.parsed(gen.finish_reasons[i])
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
            if parsed.reasoning_content is not None:
                message["reasoning_content"] = parsed.reasoning_content
            if parsed.tool_calls:
                message["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in parsed.tool_calls
                ]
            body_choices.append(
                {
                    "index": i,
                    "message": message,
                    "finish_reason": parsed.finish_reason,
                    "logprobs": self._logprobs(gen.logprobs[i]) if req.logprobs else None,
                }
            )
        return JSONResponse(
            {
                "id": gen.request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": ctx.model_name,
                "choices": body_choices,
                "usage": self._usage(gen, reasoning_ids),
            }
        )

    def _usage(self, gen: Generation, reasoning_ids: dict | None) -> dict:
        reasoning = None
        if reasoning_ids is not None:
            eos = set(self.ctx.tokenizer.eos_token_ids)
            reasoning = sum(
                count_reasoning_tokens(ids[:-1] if ids and ids[-1] in eos else ids, **reasoning_ids) for ids in gen.token_ids
            )
        return _usage(len(gen.prompt_ids), sum(map(len, gen.token_ids)), reasoning)

    async def _stream(self, gen: Generation, include_usage: bool, reasoning_ids: dict | None, logprobs: bool):
        base = {"id": gen.request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.ctx.model_name}
        for i in range(len(gen.choices)):
            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})

        async def chunks() -> AsyncIterator[dict]:
            async with aclosing(gen.steps()) as steps:
                async for step in steps:
                    payload = _delta_json(step.delta)
                    if payload or step.finish_reason is not None:
                        choice = {"index": step.index, "delta": payload, "finish_reason": step.finish_reason}
                        if logprobs and step.logprobs:
                            choice["logprobs"] = self._logprobs(step.logprobs)
                        yield {**base, "choices": [choice]}

        usage = (lambda: self._usage(gen, reasoning_ids)) if include_usage else None
        async for event in _sse_stream(self.ctx.metrics, "chat", base, chunks(), usage):
            yield event


class CompletionServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            batches = [self.ctx.tokenizer.encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            batches = [list(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            batches = [self.ctx.tokenizer.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            batches = [list(p) for p in prompt]
        else:
            raise APIError(400, "prompt must be a non-empty string, list of strings, or list of token ids", "prompt")
        for ids in batches:
            if not ids:
                raise APIError(400, "prompt is empty", "prompt")
            bad = [t for t in ids if not 0 <= t < self.ctx.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is out of vocabulary (0..{self.ctx.vocab_size - 1})", "prompt")
        return batches

    def _logprobs(self, entries: list[TokenLogprob]) -> dict:
        tokens = [self.ctx.token_text(e.token_id) for e in entries]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.ctx.token_text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    async def create(self, req: CompletionRequest) -> JSONResponse | StreamingResponse:
        ctx = self.ctx
        check_model(ctx, req.model)
        request_id = random_id("cmpl-")
        gens = []
        for p, ids in enumerate(self.prompts(req)):
            params = sampling_params(req, resolve_max_tokens(ctx, len(ids), req.max_new_tokens), req.logprobs)
            choices = [ChoiceText.create(ResponseParser(), req.stop, req.include_stop_str_in_output) for _ in range(req.n)]
            gens.append(Generation(ctx, f"{request_id}-{p}", ids, params, choices))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(request_id, gens, include_usage, req), media_type="text/event-stream")
        body_choices = []
        for p, gen in enumerate(gens):
            await gen.run()
            for i, choice in enumerate(gen.choices):
                body_choices.append(
                    {
                        "index": p * req.n + i,
                        "text": choice.text,
                        "finish_reason": gen.finish_reasons[i],
                        "logprobs": self._logprobs(gen.logprobs[i]) if req.logprobs is not None else None,
                    }
                )
        ctx.metrics.requests.labels("completions", "ok").inc()
        return JSONResponse(
            {
                "id": request_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": ctx.model_name,
                "choices": body_choices,
                "usage": _usage(sum(len(g.prompt_ids) for g in gens), sum(len(t) for g in gens for t in g.token_ids), None),
            }
        )

    async def _stream(self, request_id: str, gens: list[Generation], include_usage: bool, req: CompletionRequest):
        base = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.ctx.model_name}

        async def chunks() -> AsyncIterator[dict]:
            for p, gen in enumerate(gens):
                async with aclosing(gen.steps()) as steps:
                    async for step in steps:
                        if step.delta.content or step.finish_reason is not None:
                            choice = {"index": p * req.n + step.index, "text": step.delta.content, "finish_reason": step.finish_reason}
                            choice["logprobs"] = self._logprobs(step.logprobs) if req.logprobs is not None and step.logprobs else None
                            yield {**base, "choices": [choice]}

        def usage() -> dict:
            completion = sum(len(t) for g in gens for t in g.token_ids)
            return _usage(sum(len(g.prompt_ids) for g in gens), completion, None)

        async for event in _sse_stream(self.ctx.metrics, "completions", base, chunks(), usage if include_usage else None):
            yield event
