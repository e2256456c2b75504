"""What a request's output must follow: a grammar (`Constraint`) and the `Limits` that keep it finite.

Plain data, importable without the grammar engine: `SamplingParams` carries a Constraint, the OpenAI layer builds
it (serve/openai/grammars.py), the engine compiles and enforces it (engine/structured_output.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from s1serve.errors import S1ServeError

# Tokens Limits.for_max_tokens keeps for the answer (tool calls / JSON) before it gives reasoning a share.
ANSWER_RESERVE = 64


class StructuredOutputError(S1ServeError, ValueError):
    """A constraint cannot be built: a bad tool list or JSON Schema, or a name that is not among the tools."""


@dataclass(frozen=True)
class Limits:
    """Bounds that make every constrained output finite. None means unbounded.

    reasoning_tokens: tokens of reasoning before `</think>` is forced (0: close the reasoning at once).
    string_length: characters of a JSON string or free-form object key that the schema leaves unbounded
        (strings with enum/const are never touched; a schema's own smaller maxLength wins).
    max_calls: tool calls in one response when parallel calls are allowed.
    """

    reasoning_tokens: int | None = None
    string_length: int | None = None
    max_calls: int | None = None

    def __post_init__(self) -> None:
        for name in ("reasoning_tokens", "string_length", "max_calls"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise StructuredOutputError(f"Limits.{name} must be a non-negative integer or None, got {value!r}")
        if self.max_calls == 0:
            raise StructuredOutputError("Limits.max_calls must be at least 1")

    @classmethod
    def for_max_tokens(cls, max_tokens: int) -> Limits:
        """Limits scaled to a request's token budget B: 64 tokens are kept for the answer and reasoning may use
        half of the rest; a free JSON string or key holds at most max(16, B/8) characters; one parallel call is
        allowed per 256 tokens (at least one). A real model rarely meets these before max_tokens itself; a
        random-weight model ends its tool calls within B (docs/structured_output.md has the measurements)."""
        if max_tokens < 1:
            raise StructuredOutputError(f"max_tokens must be at least 1, got {max_tokens}")
        return cls(
            reasoning_tokens=max(0, max_tokens - ANSWER_RESERVE) // 2,
            string_length=max(16, max_tokens // 8),
            max_calls=max(1, max_tokens // 256),
        )


@dataclass(frozen=True)
class Constraint:
    """A grammar in llguidance's Lark dialect; equal constraints share one compiled grammar."""

    kind: str  # "tool_calls", "json" or "reasoning_budget"
    grammar: str
