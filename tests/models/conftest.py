"""Fixtures for model tests: one float32 s1serve LLM on the shared tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoint: Path):
    """s1serve's offline LLM on the tiny checkpoint, float32 on CPU (the dtype the exactness bounds assume)."""
    try:
        from s1serve import LLM
    except ImportError as exc:  # a failure, not a skip: these tests are the model's exactness evidence
        pytest.fail(f"s1serve.LLM is not importable ({exc}); the model tests need the offline API")
    return LLM(model=str(tiny_checkpoint), dtype="float32", device="cpu")
