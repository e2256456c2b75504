"""Reasoning parser: split a response into `reasoning_content` and `content` at `</think>`.

One `ReasoningParser` per request. `split(text)` handles a whole response; `feed(delta)` / `flush()` a stream,
holding back only a suffix that could still become a tag, so no tag ever leaks. The two are written separately
and must agree on every response cut into any pieces (tested). Rules (docs/api.md, "Reasoning and tool calls"):

- `starts_in_reasoning` is True exactly when the rendered prompt ends in an open `<think>` (thinking mode, the
  template's default; see `prompt_opens_reasoning`). When False (`enable_thinking=False`), everything is content,
  verbatim, tags included.
- In reasoning, a `<think>` at the very start of the output (the model re-opening the block) is dropped. Reasoning
  ends at the first `</think>`, which is dropped, or, when tool calls are parsed (`ends_at_tool_call`), at the first
  `<tool_call>`, which starts the content (a call ends the thinking; the tool-call parser then sees it). No end
  before the end of the output: it is all reasoning and content is None.
- Newlines ("\n") at both ends of the reasoning and right after `</think>` are dropped, as the chat template does
  when it renders the turn back (`<think>` + reasoning.strip('\n') + `</think>\n\n` + content.lstrip('\n')).
  After that, content is the output text verbatim: content == text[content_start:], so stop strings can be
  searched in the content only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from s1serve.serve.parsers.tool_calls import TOOL_CALL_START, partial_tag_suffix

THINK_START = "<think>"
THINK_END = "</think>"
TURN_START = "<|im_start|>"  # ChatML: the generation turn is the text after the last one


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the rendered prompt's last turn has a `<think>` not closed by a later `</think>`.

    The template ends a thinking-mode prompt with `<|im_start|>assistant\\n<think>` and an
    `enable_thinking=False` one with `<think></think>\\n\\n`; a continued assistant message may end inside reasoning.
    """
    turn = prompt[prompt.rfind(TURN_START) + len(TURN_START):] if TURN_START in prompt else prompt
    return turn.rfind(THINK_START) > turn.rfind(THINK_END)


def count_reasoning_tokens(
    token_ids: Sequence[int], *, starts_in_reasoning: bool, think_start_id: int, think_end_id: int,
    tool_call_start_id: int | None,
) -> int:
    """`usage.completion_tokens_details.reasoning_tokens`: output tokens inside the reasoning.

    `<think>`, `</think>` and `<tool_call>` are single added tokens, so this counts the generated ids before the
    first `</think>` or `<tool_call>` (all of them when neither comes), not counting a leading `<think>` nor the
    closing tag. Pass `tool_call_start_id=None` when the request's tool calls are not parsed (the reasoning parser's
    `ends_at_tool_call`), and the generated ids without a final stop token.
    """
    if not starts_in_reasoning:
        return 0
    ends = (think_end_id,) if tool_call_start_id is None else (think_end_id, tool_call_start_id)
    start = 1 if token_ids and token_ids[0] == think_start_id else 0
    for i in range(start, len(token_ids)):
        if token_ids[i] in ends:
            return i - start
    return len(token_ids) - start


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str | None  # None when empty
    content: str | None  # None when empty or not reached
    content_start: int | None  # offset in the output text where content begins; None if it never does


@dataclass
class ReasoningParser:
    """Per-request reasoning parser (the same for every CLI name: the model has one format)."""

    starts_in_reasoning: bool = True
    ends_at_tool_call: bool = True  # False when the request's tool calls are not parsed
    # stream state
    _mode: str = field(default="", init=False, repr=False)  # "start" | "reasoning" | "after_end" | "content"
    _buf: str = field(default="", init=False, repr=False)
    _consumed: int = field(default=0, init=False, repr=False)  # output chars before _buf
    _started: bool = field(default=False, init=False, repr=False)  # a non-newline reasoning char was emitted
    _held_nl: str = field(default="", init=False, repr=False)
    _tags: tuple[str, ...] = field(default=(), init=False, repr=False)
    content_start: int | None = field(default=None, init=False)  # see ReasoningSplit

    def __post_init__(self) -> None:
        self._mode = "start" if self.starts_in_reasoning else "content"
        if not self.starts_in_reasoning:
            self.content_start = 0
        self._tags = (THINK_END, TOOL_CALL_START) if self.ends_at_tool_call else (THINK_END,)

    def fresh(self) -> ReasoningParser:
        """A new parser with the same settings and no stream state (e.g. a probe for stop strings)."""
        return ReasoningParser(self.starts_in_reasoning, self.ends_at_tool_call)

    @property
    def in_reasoning(self) -> bool:
        """True until the reasoning has ended (stop strings do not apply yet)."""
        return self._mode in ("start", "reasoning")

    # -- whole response --------------------------------------------------------------------------------------
    def split(self, text: str) -> ReasoningSplit:
        if not self.starts_in_reasoning:
            return ReasoningSplit(None, text or None, 0)
        start = len(THINK_START) if text.startswith(THINK_START) else 0
        end = text.find(THINK_END, start)
        call = text.find(TOOL_CALL_START, start) if self.ends_at_tool_call else -1
        if call >= 0 and (end < 0 or call < end):
            return ReasoningSplit(text[start:call].strip("\n") or None, text[call:], call)
        if end < 0:
            return ReasoningSplit(text[start:].strip("\n") or None, None, None)
        reasoning = text[start:end].strip("\n") or None
        after = end + len(THINK_END)
        rest = text[after:]
        content = rest.lstrip("\n")
        if not content:
            return ReasoningSplit(reasoning, None, None)
        return ReasoningSplit(reasoning, content, after + len(rest) - len(content))

    # -- stream ----------------------------------------------------------------------------------------------
    def feed(self, delta: str) -> tuple[str, str]:
        """One text delta in; (reasoning_delta, content_delta) out, either possibly empty."""
        self._buf += delta
        return self._run(final=False)

    def flush(self) -> tuple[str, str]:
        """End of the stream: release what was held back."""
        return self._run(final=True)

    def _reasoning(self, text: str, out: list[str]) -> None:
        if not self._started:
            text = text.lstrip("\n")
            if not text:
                return
            self._started = True
        text = self._held_nl + text
        body = text.rstrip("\n")
        self._held_nl = text[len(body):]
        out.append(body)

    def _advance(self, n: int) -> None:
        self._consumed += n
        self._buf = self._buf[n:]

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            buf = self._buf
            if self._mode == "content":
                content.append(buf)
                self._advance(len(buf))
                break
            if self._mode == "after_end":
                n = len(buf) - len(buf.lstrip("\n"))
                self._advance(n)
                if not self._buf:
                    break
                self._mode = "content"
                self.content_start = self._consumed
                continue
            if self._mode == "start":
                if len(buf) < len(THINK_START) and THINK_START.startswith(buf) and not final:
                    break  # could still be a leading <think>
                if buf.startswith(THINK_START):
                    self._advance(len(THINK_START))
                self._mode = "reasoning"
                continue
            # reasoning
            end = buf.find(THINK_END)
            call = buf.find(TOOL_CALL_START) if self.ends_at_tool_call else -1
            if end < 0 and call < 0:
                keep = 0 if final else partial_tag_suffix(buf, *self._tags)
                self._reasoning(buf[:len(buf) - keep], reasoning)
                self._advance(len(buf) - keep)
                break
            if call >= 0 and (end < 0 or call < end):
                self._reasoning(buf[:call], reasoning)
                self._held_nl = ""
                self._advance(call)
                self._mode = "content"
                self.content_start = self._consumed
            else:
                self._reasoning(buf[:end], reasoning)
                self._held_nl = ""
                self._advance(end + len(THINK_END))
                self._mode = "after_end"
        if final:
            self._held_nl = ""
        return "".join(reasoning), "".join(content)
