"""Shared fixtures for the tokenizer tests: one tokenizer per session, the golden data from the reference."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from s1serve.assets import ASSETS_DIR
from s1serve.tokenizer import Tokenizer, load_tokenizer

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "tokenizer"
FLAG_KEYS = {(False, False): "skip=0,spaces=0", (False, True): "skip=0,spaces=1",
             (True, False): "skip=1,spaces=0", (True, True): "skip=1,spaces=1"}


@lru_cache(maxsize=None)
def golden(name: str) -> dict[str, Any]:
    """encode_golden / decode_golden / chat_golden, as written by make_golden.py from the reference."""
    return json.loads((GOLDEN_DIR / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return load_tokenizer(ASSETS_DIR)
