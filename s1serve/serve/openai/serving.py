"""Chat and text completions over an EngineClient: each handler prepares the request (prepare.py), runs it
(generation.py) and renders the response or its event stream (render.py).

The event loop only does I/O: chat rendering, tokenisation and building a grammar run in worker threads
(asyncio.to_thread), so a long prompt being prepared does not hold up other requests' streams or /health. The
prompts of one completions request run at once, as separate engine requests.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi.responses import JSONResponse, StreamingResponse

from s1serve.layers.sampler import TokenLogprob
from s1serve.sampling_params import InvalidParameterError, check_token_ids
from s1serve.serve.openai import render
from s1serve.serve.openai.choice import ChoiceText
from s1serve.serve.openai.errors import APIError
from s1serve.serve.openai.concurrent import merge, run_all, start_all
from s1serve.serve.openai.generation import Generation
from s1serve.serve.openai.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_field
from s1serve.serve.openai.media import media_parts, process_media
from s1serve.serve.openai.prepare import (
    ServingContext,
    chat_constraint,
    check_capacity,
    check_model,
    render_chat_prompt,
    resolve_max_tokens,
    response_parser,
    sampling_params,
)
from s1serve.serve.openai.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice, random_id
from s1serve.serve.parsers.reasoning import count_reasoning_tokens, prompt_opens_reasoning
from s1serve.serve.parsers.response import ResponseParser
from s1serve.multimodal.chat import MediaRef


@dataclass
class PreparedChat:
    gen: Generation
    reasoning_ids: dict | None  # count_reasoning_tokens' arguments, None without a reasoning parser
    usage: Callable[[], dict]  # the chat usage object of the generation so far


class ChatServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def render(self, req: ChatCompletionRequest) -> tuple[str, list[int], list[MediaRef]]:
        """The templated prompt, its ids, and the media items its placeholders stand for (ids not yet expanded)."""
        messages, refs = media_parts([m.model_dump(exclude_none=True) for m in req.messages], self.ctx.media)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
        prompt = render_chat_prompt(
            self.ctx.tokenizer, messages, tools, req.add_generation_prompt, req.chat_template_kwargs
        )
        return prompt, self.ctx.tokenizer.encode(prompt), refs

    async def prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int], tuple]:
        """The templated prompt, its ids with each media item's pads expanded, and the processed media."""
        prompt, prompt_ids, refs = await asyncio.to_thread(self.render, req)
        if not refs:
            return prompt, prompt_ids, ()
        prompt_ids, media = await process_media(self.ctx.media, prompt, refs, req.mm_processor_kwargs)
        return prompt, prompt_ids, media

    async def prepare(self, req: ChatCompletionRequest, reasoning_budget: int | None = None) -> PreparedChat:
        """Render, limits, sampling parameters, constraint and parsers of a chat request, ready to run. The
        Responses and Messages APIs translate their requests into a chat request and run it through here too."""
        ctx = self.ctx
        check_model(ctx, req.model)
        if req.echo:
            raise APIError(400, "echo is not supported for chat completions (it is for /v1/completions)", "echo")
        check_capacity(ctx)
        prompt, prompt_ids, media = await self.prompt(req)
        max_tokens = resolve_max_tokens(ctx, len(prompt_ids), req.max_new_tokens)
        opens_reasoning = prompt_opens_reasoning(prompt)
        starts_in_reasoning = ctx.reasoning_parser is not None and opens_reasoning
        tool_names = None
        if req.tools and req.tool_choice != "none":
            tool_names = {t.function.name for t in req.tools}
            if isinstance(req.tool_choice, NamedToolChoice):
                tool_names = {req.tool_choice.function.name}
        constraint = await asyncio.to_thread(chat_constraint, req, opens_reasoning, max_tokens, reasoning_budget)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(
            req, max_tokens, logprobs, constraint, vocab_size=ctx.vocab_size, prompt_logprobs=req.prompt_logprobs
        )
        choices = [
            ChoiceText.create(response_parser(ctx, starts_in_reasoning, tool_names, req.parallel_tool_calls), req.stop, req.include_stop_str_in_output)
            for _ in range(req.n)
        ]
        gen = Generation(ctx, random_id("chatcmpl-"), prompt_ids, params, choices, media=media)
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
        prepared = await self.prepare(req)
        gen, reasoning_ids = prepared.gen, prepared.reasoning_ids
        if req.stream:
            with ctx.metrics.counted_if_failed("chat"):
                await gen.start()
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self._stream(gen, include_usage, reasoning_ids, req)
            return StreamingResponse(stream, media_type="text/event-stream")
        with ctx.metrics.counted("chat"):
            await gen.run()
        body_choices = []
        for i in range(len(gen.choices)):
            parsed = gen.parsed(i)
            # reasoning_content is always present (null without reasoning), so that clients may read it.
            message: dict[str, Any] = {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning_content}
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
                    "logprobs": chat_logprobs(gen.logprobs[i], ctx.token_text) if req.logprobs else None,
                    **({"token_ids": gen.token_ids[i]} if req.return_token_ids else {}),
                }
            )
        body = {
            "id": gen.request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ctx.model_name,
            "choices": body_choices,
            "usage": self._usage(gen, reasoning_ids),
        }
        if req.return_token_ids:
            body["prompt_token_ids"] = gen.prompt_ids
        body.update(prompt_logprobs_field(req.prompt_logprobs, gen.prompt_logprobs, ctx.token_text))  # vLLM: top level
        return JSONResponse(body)

    def _usage(self, gen: Generation, reasoning_ids: dict | None) -> dict:
        reasoning = None
        if reasoning_ids is not None:
            eos = set(self.ctx.tokenizer.eos_token_ids)
            reasoning = sum(
                count_reasoning_tokens(ids[:-1] if ids and ids[-1] in eos else ids, **reasoning_ids) for ids in gen.token_ids
            )
        return render.usage(len(gen.prompt_ids), sum(map(len, gen.token_ids)), reasoning, gen.num_cached_tokens)

    async def _stream(self, gen: Generation, include_usage: bool, reasoning_ids: dict | None, req: ChatCompletionRequest):
        logprobs, token_ids = req.logprobs, req.return_token_ids
        base = {"id": gen.request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.ctx.model_name}
        for i in range(len(gen.choices)):
            first = {**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            if token_ids:
                first["prompt_token_ids"] = gen.prompt_ids
            if i == 0:  # start() has received the first output, which carries them
                first.update(prompt_logprobs_field(req.prompt_logprobs, gen.prompt_logprobs, self.ctx.token_text))
            yield render.sse(first)

        async def chunks() -> AsyncIterator[dict]:
            async with aclosing(gen.steps()) as steps:
                async for step in steps:
                    payload = render.delta_json(step.delta)
                    if payload or step.finish_reason is not None or (token_ids and step.token_ids):
                        choice = {"index": step.index, "delta": payload, "finish_reason": step.finish_reason}
                        if logprobs and step.logprobs:
                            choice["logprobs"] = chat_logprobs(step.logprobs, self.ctx.token_text)
                        if token_ids:
                            choice["token_ids"] = step.token_ids
                        yield {**base, "choices": [choice]}

        usage = (lambda: self._usage(gen, reasoning_ids)) if include_usage else None
        async for event in render.sse_stream(self.ctx.metrics, "chat", base, chunks(), usage):
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
            try:
                check_token_ids(ids, self.ctx.vocab_size)
            except InvalidParameterError as exc:
                raise APIError(400, str(exc), exc.param) from None
        return batches

    async def create(self, req: CompletionRequest) -> JSONResponse | StreamingResponse:
        ctx = self.ctx
        check_model(ctx, req.model)
        check_capacity(ctx)
        request_id = random_id("cmpl-")
        gens = []
        for p, ids in enumerate(await asyncio.to_thread(self.prompts, req)):
            max_tokens = resolve_max_tokens(ctx, len(ids), req.max_new_tokens)
            prompt_logprobs = self._engine_prompt_logprobs(req)
            params = sampling_params(req, max_tokens, req.logprobs, vocab_size=ctx.vocab_size, prompt_logprobs=prompt_logprobs)
            choices = [ChoiceText.create(ResponseParser(), req.stop, req.include_stop_str_in_output) for _ in range(req.n)]
            gens.append(Generation(ctx, f"{request_id}-{p}", ids, params, choices))
        if req.stream:
            with ctx.metrics.counted_if_failed("completions"):
                await start_all(gens)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(request_id, gens, include_usage, req), media_type="text/event-stream")
        with ctx.metrics.counted("completions"):
            await run_all(gens)
        body_choices = []
        for p, gen in enumerate(gens):
            echoed_ids, echoed_logprobs = self._echoed(req, gen)
            for i, choice in enumerate(gen.choices):
                body_choices.append(
                    {
                        "index": p * req.n + i,
                        "text": self._echo(req, gen) + choice.text,
                        "finish_reason": gen.finish_reasons[i],
                        "logprobs": self._logprobs(req, echoed_ids + gen.token_ids[i], echoed_logprobs + gen.logprobs[i]),
                        **prompt_logprobs_field(req.prompt_logprobs, gen.prompt_logprobs, ctx.token_text),  # vLLM: per choice
                        **self._token_ids(req, gen, gen.token_ids[i]),
                    }
                )
        return JSONResponse(
            {
                "id": request_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": ctx.model_name,
                "choices": body_choices,
                "usage": self._usage(gens),
            }
        )

    @staticmethod
    def _engine_prompt_logprobs(req: CompletionRequest) -> int | None:
        """Prompt logprobs the engine computes: those asked for, and those an echo with logprobs shows (vLLM's)."""
        if req.echo and req.logprobs is not None:
            return max(req.logprobs, req.prompt_logprobs or 0)
        return req.prompt_logprobs

    def _logprobs(
        self, req: CompletionRequest, token_ids: list[int], entries: Sequence[TokenLogprob | None]
    ) -> dict | None:
        if req.logprobs is None:
            return None
        return completion_logprobs(token_ids, entries, req.logprobs, self.ctx.token_text)

    @staticmethod
    def _echoed(req: CompletionRequest, gen: Generation) -> tuple[list[int], list[TokenLogprob | None]]:
        """The echoed prompt's ids and logprobs (the first None), which come before a choice's own."""
        if not req.echo:
            return [], []
        return list(gen.prompt_ids), list(gen.prompt_logprobs or [])

    def _echo(self, req: CompletionRequest, gen: Generation) -> str:
        """The prompt's text when the request asks for it echoed (decoded so that it round-trips)."""
        if not req.echo:
            return ""
        return self.ctx.tokenizer.decode(gen.prompt_ids, skip_special_tokens=False, spaces_between_special_tokens=False)

    @staticmethod
    def _token_ids(req: CompletionRequest, gen: Generation, token_ids: list[int]) -> dict:
        return {"prompt_token_ids": gen.prompt_ids, "token_ids": token_ids} if req.return_token_ids else {}

    @staticmethod
    def _usage(gens: list[Generation]) -> dict:
        completion = sum(len(t) for g in gens for t in g.token_ids)
        return render.usage(sum(len(g.prompt_ids) for g in gens), completion, None, sum(g.num_cached_tokens for g in gens))

    async def _stream(self, request_id: str, gens: list[Generation], include_usage: bool, req: CompletionRequest):
        base = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.ctx.model_name}

        async def chunks(p: int, gen: Generation) -> AsyncIterator[dict]:
            if req.echo or req.prompt_logprobs is not None:  # each choice's first chunk: the prompt's
                for i in range(req.n):
                    logprobs = self._logprobs(req, *self._echoed(req, gen)) if req.echo else None
                    yield {**base, "choices": [{"index": p * req.n + i, "text": self._echo(req, gen), "finish_reason": None,
                                                "logprobs": logprobs,
                                                **prompt_logprobs_field(req.prompt_logprobs, gen.prompt_logprobs,
                                                                        self.ctx.token_text),
                                                **self._token_ids(req, gen, [])}]}
            async with aclosing(gen.steps()) as steps:
                async for step in steps:
                    if step.delta.content or step.finish_reason is not None or (req.return_token_ids and step.token_ids):
                        choice = {"index": p * req.n + step.index, "text": step.delta.content, "finish_reason": step.finish_reason}
                        choice["logprobs"] = self._logprobs(req, step.token_ids, step.logprobs) if step.logprobs else None
                        if req.return_token_ids:
                            choice["token_ids"] = step.token_ids
                        yield {**base, "choices": [choice]}

        usage = (lambda: self._usage(gens)) if include_usage else None
        merged = merge([chunks(p, gen) for p, gen in enumerate(gens)])
        async for event in render.sse_stream(self.ctx.metrics, "completions", base, merged, usage):
            yield event
