"""Fault isolation: an exception while handling one request (its sampler row, grammar, detokenizer, stop strings,
vision encoding, or on the API side its parser) fails that request only, with an error naming the stage; the
engine goes on with the others. The model forward is not isolated: its failure is the engine's death.

Batched stages (the sampler over a step's rows, the grammar masks of a step) run as one call; only when that
call raises are they redone row by row to find the rows that fail (`per_row`), so a step without failures costs
nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class StageError(Exception):
    """An exception in a per-request stage, tagged with that stage; the original is its `__cause__`."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(fault_message(stage, cause))
        self.stage = stage


def fault_message(stage: str, exc: BaseException) -> str:
    """What the client is told (HTTP 500: the failure is the server's, not the request's)."""
    cause = exc.__cause__ if isinstance(exc, StageError) and exc.__cause__ is not None else exc
    return f"internal error in {stage} for this request: {type(cause).__name__}: {cause}"


def per_row(count: int, run_row: Callable[[int], T]) -> tuple[dict[int, T], dict[int, Exception]]:
    """Runs a batched stage again one row at a time: the results of the rows that pass, the errors of the others."""
    results: dict[int, T] = {}
    errors: dict[int, Exception] = {}
    for row in range(count):
        try:
            results[row] = run_row(row)
        except Exception as exc:  # noqa: BLE001 - the row's request fails, the others go on
            errors[row] = exc
    return results, errors
