"""Fixtures of the engine tests: the shared prompt set and its one-at-a-time greedy reference."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from engine_testing import GREEDY, make_llm, random_prompts


@pytest.fixture(scope="session")
def mixed_prompts() -> list[list[int]]:
    """32 prompts of 1..500 tokens; half start with one of two shared prefixes (for the prefix cache)."""
    rng = random.Random(1234)
    prefixes = random_prompts(2, 150, 150, seed=7)
    prompts = random_prompts(32, 1, 500, seed=42)
    prompts[0], prompts[1] = prompts[0][:1], (prompts[1] * 2)[:500]
    for i in range(2, 32, 2):
        prompts[i] = (prefixes[i % 4 // 2] + prompts[i])[: rng.randint(160, 500)]
    return prompts


@pytest.fixture(scope="session")
def one_at_a_time(tiny_checkpoint: Path, mixed_prompts: list[list[int]]) -> list[list[int]]:
    """Greedy ids of each prompt generated alone, without prefix caching: the reference for batched runs."""
    llm = make_llm(tiny_checkpoint, enable_prefix_caching=False)
    return [
        llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False)[0].token_ids for p in mixed_prompts
    ]
