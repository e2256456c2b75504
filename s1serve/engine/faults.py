"""Test-only fault injection, for the fault-isolation tests; never set it in production.

`S1SERVE_TEST_FAULT="STAGE:TOKEN_ID,STAGE:TOKEN_ID,..."` makes STAGE raise `InjectedFault` for every request
whose prompt contains TOKEN_ID. Stages: `sampler` (the step's batched sampler call), `grammar` (the step's
batched grammar-mask fill), `detokenizer`, `stop` (stop-string matching), `vision` (encoding the request's
images), all in the engine, and `parser` (the response parser, in the API server). It is read once when the
engine or the server starts; unset, nothing is wrapped and no request is looked at.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from s1serve.engine.grammar import Grammars, Matcher
from s1serve.engine.text_output import Detokenizer, TextOutput

ENV = "S1SERVE_TEST_FAULT"
STAGES = ("sampler", "grammar", "detokenizer", "stop", "vision", "parser")

log = logging.getLogger("s1serve.faults")


class InjectedFault(RuntimeError):
    """The fault a test asked for."""

    def __init__(self, stage: str):
        super().__init__(f"fault injected into the {stage} stage ({ENV})")


@dataclass(frozen=True)
class FaultPlan:
    markers: Mapping[str, frozenset[int]]  # stage -> token ids whose presence in a prompt makes it raise

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultPlan | None:
        spec = environ.get(ENV, "").strip()
        if not spec:
            return None
        markers: dict[str, set[int]] = defaultdict(set)
        for entry in spec.split(","):
            stage, _, marker = entry.strip().partition(":")
            if stage not in STAGES or not marker.strip().isdigit():
                raise ValueError(f"{ENV}: {entry!r} is not STAGE:TOKEN_ID with STAGE one of {', '.join(STAGES)}")
            markers[stage].add(int(marker))
        log.warning("test-only fault injection is on: %s=%s", ENV, spec)
        return cls({stage: frozenset(ids) for stage, ids in markers.items()})

    def hits(self, stage: str, prompt_ids: Collection[int]) -> bool:
        ids = self.markers.get(stage)
        return bool(ids) and not ids.isdisjoint(prompt_ids)

    def check(self, stage: str, prompt_ids: Collection[int]) -> None:
        if self.hits(stage, prompt_ids):
            raise InjectedFault(stage)

    # -- the engine's stages --------------------------------------------------------------------------------
    def sampler(self, sampler: Any) -> Any:
        return _FaultySampler(sampler, self) if "sampler" in self.markers else sampler

    def grammars(self, grammars: Grammars) -> Grammars:
        return _FaultyGrammars(grammars) if "grammar" in self.markers else grammars

    def matcher(self, prompt_ids: Sequence[int], matcher: Matcher) -> Matcher:
        return _MarkedMatcher(matcher) if self.hits("grammar", prompt_ids) else matcher

    def text_output(self, prompt_ids: Sequence[int], detokenizer: Detokenizer | None, stop: tuple[str, ...]) -> TextOutput:
        if detokenizer is not None and self.hits("detokenizer", prompt_ids):
            detokenizer = _Raising(detokenizer, "detokenizer", ("feed", "finish"))
        return (_StopFault if self.hits("stop", prompt_ids) else TextOutput)(detokenizer, stop)

    # -- the API server's -----------------------------------------------------------------------------------
    def parser(self, prompt_ids: Sequence[int], parser: Any) -> Any:
        return _Raising(parser, "parser", ("feed", "parse")) if self.hits("parser", prompt_ids) else parser


class _Raising:
    """`inner`, except that the named methods raise."""

    def __init__(self, inner: Any, stage: str, methods: tuple[str, ...]):
        self._inner = inner
        self._stage = stage
        self._methods = methods

    def __getattr__(self, name: str) -> Any:
        if name in self._methods:
            raise InjectedFault(self._stage)
        return getattr(self._inner, name)


class _StopFault(TextOutput):
    def _add(self, piece: str) -> str | None:
        raise InjectedFault("stop")


class _MarkedMatcher:
    """A matcher whose masks fail to fill (see _FaultyGrammars)."""

    def __init__(self, inner: Matcher):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _FaultyGrammars:
    def __init__(self, inner: Grammars):
        self._inner = inner

    def validate(self, constraint: Any) -> None:
        self._inner.validate(constraint)

    def matcher(self, constraint: Any) -> Matcher:
        return self._inner.matcher(constraint)

    def fill_bitmasks(self, matchers: Sequence[tuple[Matcher, int]], bitmask: Any) -> None:
        if any(isinstance(m, _MarkedMatcher) for m, _ in matchers):
            raise InjectedFault("grammar")
        self._inner.fill_bitmasks(matchers, bitmask)


class _FaultySampler:
    def __init__(self, inner: Any, plan: FaultPlan):
        self._inner = inner
        self._plan = plan

    def __call__(self, logits: Any, params: list, generators: list, prompt_ids: list[list[int]], output_ids: list) -> Any:
        if any(self._plan.hits("sampler", ids) for ids in prompt_ids):
            raise InjectedFault("sampler")
        return self._inner(logits, params, generators, prompt_ids, output_ids)
