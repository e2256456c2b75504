"""Per-request sampling settings. Unset fields (None) take the checkpoint's generation_config.json defaults.

Every check raises `InvalidParameterError` (a ValueError) whose message names the field and the allowed range,
and whose `param` attribute carries the field name so that the server can report it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from s1serve.config import GenerationDefaults
from s1serve.constraints import Constraint

MAX_LOGPROBS = 20  # the OpenAI API's cap on top_logprobs


class InvalidParameterError(ValueError):
    """A request field outside its allowed range; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_token_ids(
    token_ids: Sequence[object], vocab_size: int, param: str = "prompt", what: str = "prompt token id"
) -> None:
    """Every id an integer in the model's vocabulary; else InvalidParameterError naming the first that is not."""
    bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidParameterError(param, f"{what} {bad!r} is outside the vocabulary (0..{vocab_size - 1})")


def check_context_length(
    prompt_len: int, max_model_len: int, max_tokens: int | None = None, prompt_param: str = "prompt"
) -> int:
    """The output tokens a request may have: `max_tokens`, or all the room left when it is None. A prompt must
    leave one position for output, and prompt + max_tokens must fit max_model_len; else InvalidParameterError."""
    if prompt_len >= max_model_len:
        raise InvalidParameterError(
            prompt_param,
            f"This model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len}, and "
            f"max_model_len is {max_model_len}, so a prompt may have at most {max_model_len - 1} (one position is "
            "needed for output)",
        )
    room = max_model_len - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise InvalidParameterError(
            "max_tokens",
            f"This model's maximum context length is {max_model_len} tokens; the request has {prompt_len} prompt "
            f"tokens and asks for max_tokens {max_tokens} ({prompt_len} + {max_tokens} > {max_model_len})",
        )
    return max_tokens


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: until max_model_len
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1: off
    min_p: float | None = None
    repetition_penalty: float | None = None  # on prompt and output tokens (1.0: off)
    presence_penalty: float = 0.0  # on output tokens
    frequency_penalty: float = 0.0  # on output tokens, per occurrence
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the sampled token's logprob and the k most likely
    prompt_logprobs: int | None = None  # None: off; k >= 0: each prompt token's logprob (after the first) and top k
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    constraint: Constraint | None = None  # a grammar the output must follow (tool_choice, response_format)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to that token's logit

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))
        self._check()

    def _check(self) -> None:
        def bad(param: str, message: str) -> InvalidParameterError:
            return InvalidParameterError(param, f"{param} {message}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature is not None and (not _is_number(self.temperature) or self.temperature < 0):
            raise bad("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < -1):
            raise bad("top_k", f"must be -1 or 0 (off) or an integer >= 1, got {self.top_k!r}")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0 <= self.min_p <= 1):
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty is not None and (
            not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0
        ):
            raise bad("repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, f"must be in [-2, 2], got {value!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", f"must be non-empty strings, got {list(self.stop)!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"must be token ids >= 0, got {list(self.stop_token_ids)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        for token, value in self.logit_bias:
            if not _is_int(token) or token < 0:
                raise bad("logit_bias", f"keys must be token ids >= 0, got {token!r}")
            if not _is_number(value) or not -100 <= value <= 100:
                raise bad("logit_bias", f"values must be in [-100, 100], got {value!r} for token {token}")
        if self.n > 1 and self.temperature == 0:
            raise bad("n", f"must be 1 with greedy sampling (temperature 0), got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_defaults(self, defaults: GenerationDefaults) -> "SamplingParams":
        """Fills every unset field from the checkpoint's generation defaults."""
        return replace(
            self,
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            min_p=defaults.min_p if self.min_p is None else self.min_p,
            repetition_penalty=(
                defaults.repetition_penalty if self.repetition_penalty is None else self.repetition_penalty
            ),
        )
