"""Fixtures shared by the whole test tree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# Test-only helpers that live in tests/ (e.g. reference_model.py) import as top-level modules.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

TINY_CHECKPOINT_SPEC = {"preset": "tiny", "seed": 0, "arch": "interns1_pro"}


@pytest.fixture(scope="session")
def tiny_checkpoint_spec() -> dict:
    """The write_tiny_checkpoint arguments behind `tiny_checkpoint`."""
    return dict(TINY_CHECKPOINT_SPEC)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A make-tiny checkpoint (preset tiny, seed 0, interns1_pro layout), written once per test session.

    Shared by every test that needs real weights; treat it as read-only.
    """
    from s1serve.checkpoint.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), **TINY_CHECKPOINT_SPEC)
