"""The offline API: `LLM(model=PATH).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from s1serve.config import load_generation_defaults, load_model_config
from s1serve.engine.model_runner import ModelRunner, StepSequence
from s1serve.layers.sampler import sample
from s1serve.models.registry import load_model, resolve_dtype
from s1serve.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos or stop token) or "length" (max_tokens)


class LLM:
    def __init__(self, model: str | Path, dtype: str = "auto", device: str = "cpu", block_size: int = 16):
        self.model_dir = Path(model)
        self.config = load_model_config(self.model_dir)
        self.defaults = load_generation_defaults(self.model_dir)
        self.dtype = resolve_dtype(self.config.text.dtype if dtype == "auto" else dtype)
        self.device = torch.device(device)
        self.block_size = block_size
        self.model = load_model(self.model_dir, self.dtype, self.device)

    @cached_property
    def tokenizer(self):
        from s1serve.tokenizer import load_tokenizer

        return load_tokenizer(self.model_dir)

    def _runner(self, total_tokens: Sequence[int]) -> tuple[ModelRunner, list[list[int]]]:
        """A runner whose cache gives every sequence its own contiguous run of blocks."""
        tables, next_block = [], 0
        for tokens in total_tokens:
            blocks = -(-tokens // self.block_size)
            tables.append(list(range(next_block, next_block + blocks)))
            next_block += blocks
        return ModelRunner(self.model, next_block, self.block_size), tables

    def _check_prompt(self, ids: list[int], max_tokens: int) -> None:
        vocab = self.config.text.vocab_size
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        limit = self.config.text.max_position_embeddings
        if len(ids) + max_tokens > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's {limit} positions")

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[RequestOutput]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            prompt_token_ids = [self.tokenizer.encode(p) for p in prompts]
        prompt_ids = [list(map(int, ids)) for ids in prompt_token_ids]
        params = (sampling_params or SamplingParams()).with_defaults(self.defaults)
        for ids in prompt_ids:
            self._check_prompt(ids, params.max_tokens)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.defaults.eos_token_ids))

        runner, tables = self._runner([len(p) + params.max_tokens for p in prompt_ids])
        generators = [
            None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed + i)
            for i in range(len(prompt_ids))
        ]
        outputs = [RequestOutput(p, [], "", "length") for p in prompt_ids]
        step = [StepSequence(p, 0, t) for p, t in zip(prompt_ids, tables)]
        live = list(range(len(prompt_ids)))
        while live:
            new_ids = sample(runner.last_logits(step), [params] * len(live), [generators[i] for i in live])
            still, step = [], []
            for i, token in zip(live, new_ids):
                out = outputs[i]
                out.token_ids.append(token)
                if token in stop_ids:
                    out.finish_reason = "stop"
                elif len(out.token_ids) < params.max_tokens:
                    still.append(i)
                    step.append(StepSequence([token], len(out.prompt_token_ids) + len(out.token_ids) - 1, tables[i]))
            live = still
        for out in outputs:
            out.text = self.tokenizer.decode(out.token_ids)
        return outputs

    def prompt_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Float32 logits [len(token_ids), vocab] at every position of one full prefill."""
        ids = list(map(int, token_ids))
        self._check_prompt(ids, 0)
        runner, tables = self._runner([len(ids)])
        seq = StepSequence(ids, 0, tables[0])
        with torch.inference_mode():
            return self.model.compute_logits(runner.hidden_states([seq]))
