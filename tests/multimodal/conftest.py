"""Shared objects for the multimodal tests: the published tokenizer and processor configs, the golden inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from s1serve.assets import ASSETS_DIR
from s1serve.multimodal import MultimodalProcessor
from s1serve.tokenizer import load_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "multimodal_processing"


@pytest.fixture(scope="session")
def mm_tokenizer():
    return load_tokenizer(ASSETS_DIR)


@pytest.fixture(scope="session")
def mm_processor(mm_tokenizer) -> MultimodalProcessor:
    return MultimodalProcessor.from_model_dir(ASSETS_DIR, mm_tokenizer)


@pytest.fixture(scope="session")
def goldens() -> dict:
    return json.loads((FIXTURES / "goldens.json").read_text())


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()
