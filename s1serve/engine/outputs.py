"""What the engine hands back: per-step deltas of each sample, and whole results assembled from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from s1serve.layers.sampler import TokenLogprob


@dataclass(frozen=True)
class OutputDelta:
    """What one sample of a request gained in one engine step."""

    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]  # new ids
    text: str  # new text (stop strings and text that may still start one held back)
    logprobs: list[TokenLogprob] | None  # of the new ids, when the request asked for logprobs
    finish_reason: str | None  # "stop", "length", "abort" or "error" on the sample's last delta
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held when the prompt was admitted
    error: str | None = None  # with finish_reason "error": what failed while handling the request (engine/isolation.py)
    # On the request's first output, when it asks for prompt logprobs: None for the first prompt token, then each
    # later prompt token scored by the logits of the position before it (engine/prompt_logprobs.py).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None  # why the sample ended with finish_reason "error"

    def add(self, delta: OutputDelta) -> None:
        self.token_ids += delta.token_ids
        self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason
        self.error = delta.error


@dataclass
class RequestOutput:
    """A request's result; `token_ids`, `text` and `finish_reason` are those of its first sample."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when asked for (OutputDelta.prompt_logprobs)

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)
