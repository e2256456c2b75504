"""The offline API: `LLM(model=PATH).generate(prompts, SamplingParams(...))`, batched through the engine.

`LLM(PATH, tp=2)` (or ep=, and the other ParallelConfig fields) runs the engine here as rank 0 of a TP/EP group
whose other ranks it starts itself (or, with nnodes > 1, that `s1serve serve api_server --headless` starts on
the other nodes); `shutdown()` stops them. Data parallelism is for the server (`s1serve serve api_server --dp N`).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import fields
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from s1serve.engine.config import EngineConfig
from s1serve.engine.media import MediaInput
from s1serve.engine.outputs import CompletionOutput, RequestOutput
from s1serve.entrypoints.engine import build_engine
from s1serve.multimodal.chat import MediaArgs, MediaPipeline, extract_media
from s1serve.parallel.config import ParallelConfig
from s1serve.sampling_params import InvalidParameterError, SamplingParams

Message = dict[str, Any]


class LLM:
    """Loads a checkpoint and runs batches of prompts through one engine.

    Engine arguments (`block_size`, `num_kv_blocks`, `max_num_batched_tokens`, ...) are the fields of EngineConfig,
    parallel ones (`tp`, `ep`, `distributed_executor_backend`, `nnodes`, ...) those of ParallelConfig, media ones
    (`allowed_local_media_path`, `allowed_media_domains`, `limit_mm_per_prompt`, `media_io_kwargs`, ...) those of
    s1serve.multimodal.chat.MediaArgs (the server's flags): `chat` takes image_url / video_url content parts.
    The tokenizer loads on first use; with skip_tokenizer_init=True there is none (outputs carry ids, no text).
    """

    def __init__(
        self,
        model: str | Path,
        dtype: str = "auto",
        device: str = "cpu",
        skip_tokenizer_init: bool = False,
        **engine_args: Any,
    ):
        names = [f.name for f in fields(ParallelConfig) if f.name in engine_args]
        parallel = ParallelConfig(**{name: engine_args.pop(name) for name in names})
        media_names = [f.name for f in fields(MediaArgs) if f.name in engine_args]
        self.media_args = MediaArgs(**{name: engine_args.pop(name) for name in media_names})
        if parallel.dp > 1:
            raise ValueError(
                f"LLM runs one engine, so dp must be 1 (got {parallel.dp}); serve data parallelism with "
                f"`s1serve serve api_server MODEL --dp {parallel.dp}`"
            )
        if parallel.headless:
            raise ValueError("LLM hosts rank 0; run the other nodes with `s1serve serve api_server MODEL --headless`")
        self.model_dir = Path(model)
        self.skip_tokenizer_init = skip_tokenizer_init
        config = EngineConfig(**engine_args)
        self.engine = build_engine(self.model_dir, dtype, device, config, parallel=parallel)
        self.config = self.engine.runner.model.config
        self.defaults = self.engine.defaults
        self._ids = itertools.count()

    @cached_property
    def tokenizer(self) -> Any:
        from s1serve.tokenizer import load_tokenizer

        return load_tokenizer(self.model_dir)

    @cached_property
    def media(self) -> MediaPipeline:
        return MediaPipeline.build(self.model_dir, self.tokenizer, self.media_args)

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One output per prompt, in prompt order. `sampling_params` is one for all prompts or one per prompt."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if self.engine.tokenizer is None and not self.skip_tokenizer_init:
            self.engine.tokenizer = self.tokenizer
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            prompt_token_ids = [self.tokenizer.encode(p) for p in prompts]
        prompt_ids = [list(map(int, ids)) for ids in prompt_token_ids]
        params = _per_prompt(sampling_params, len(prompt_ids))
        return self._checked_run(prompt_ids, params, [()] * len(prompt_ids), use_tqdm)

    def _checked_run(
        self, prompt_ids: list[list[int]], params: list[SamplingParams], media: list[tuple[MediaInput, ...]],
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        for ids, p, m in zip(prompt_ids, params, media):
            self.engine.check_request(ids, p, m)
        return self._run(prompt_ids, params, media, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        use_tqdm: bool = True,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generates the assistant turn of one conversation (a list of messages) or of each of several. Content
        parts `image_url` / `input_image` / `video_url` (data:, http(s)://, file:// URLs, fetched under the media
        arguments' policy) are processed as the server does; a bad item raises MediaError."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        if self.engine.tokenizer is None and not self.skip_tokenizer_init:
            self.engine.tokenizer = self.tokenizer
        prompt_ids, media = [], []
        for conv in conversations:
            conv, refs = extract_media(list(conv))
            prompt = self.tokenizer.apply_chat_template(
                conv, tools=tools, add_generation_prompt=True, **(chat_template_kwargs or {})
            )
            if not refs:
                prompt_ids.append(self.tokenizer.encode(prompt))
                media.append(())
                continue
            processed = asyncio.run(self.media.process(prompt, refs, mm_processor_kwargs))
            prompt_ids.append(processed.token_ids)
            media.append(tuple(MediaInput.of(item) for item in processed.items))
        return self._checked_run(prompt_ids, _per_prompt(sampling_params, len(prompt_ids)), media, use_tqdm)

    def _run(
        self, prompt_ids: list[list[int]], params: list[SamplingParams], media: list[tuple[MediaInput, ...]],
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        for ids, p, m in zip(prompt_ids, params, media):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, ids, p, m)
            results[request_id] = RequestOutput(request_id, ids, [])
        progress = tqdm(total=len(results), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        generated = 0
        try:
            while any(r.request_id in self.engine.requests for r in results.values()):
                for delta in self.engine.step():
                    result = results[delta.request_id]
                    while len(result.outputs) <= delta.index:
                        result.outputs.append(CompletionOutput(len(result.outputs)))
                    result.outputs[delta.index].add(delta)
                    if delta.prompt_logprobs is not None:
                        result.prompt_logprobs = delta.prompt_logprobs
                    generated += len(delta.token_ids)
                    if delta.finish_reason is not None and delta.request_id not in self.engine.requests:
                        progress.update(1)
                        progress.set_postfix(output_tokens=generated, refresh=False)
        finally:
            for request_id in results:
                self.engine.abort(request_id)
            progress.close()
        return list(results.values())

    def prompt_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Float32 logits [len(token_ids), vocab] at every position of one full prefill (outside the engine)."""
        ids = list(map(int, token_ids))
        self.engine.check_request(ids, SamplingParams())
        return self.engine.runner.prompt_logits(ids)

    def shutdown(self) -> None:
        """Stops the engine's other ranks (if it has any); the LLM cannot generate afterwards."""
        self.engine.shutdown()


def _per_prompt(sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: the one given for all, or the list given (of the right length)."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * count
    params = list(sampling_params)
    if len(params) != count:
        raise InvalidParameterError("sampling_params", f"got {len(params)} sampling_params for {count} prompts")
    return params
