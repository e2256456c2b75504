"""Helpers shared by the engine tests (tiny checkpoint, bf16: the checkpoint's own dtype)."""

from __future__ import annotations

import random
from pathlib import Path

from s1serve import LLM, SamplingParams

VOCAB_LOW, VOCAB_HIGH = 1000, 150000  # ordinary tokens, away from special ids
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def random_prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(rng.randint(low, high))] for _ in range(count)]


def make_llm(checkpoint: Path, **engine_args) -> LLM:
    """An LLM on the checkpoint with small blocks (16 tokens) and 512 of them unless told otherwise."""
    engine_args.setdefault("block_size", 16)
    engine_args.setdefault("num_kv_blocks", 512)
    engine_args.setdefault("skip_tokenizer_init", True)
    return LLM(model=str(checkpoint), **engine_args)
