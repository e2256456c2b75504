"""One choice of one response: engine text in, parsed OpenAI deltas out, stop strings applied to content only.

The engine streams raw text. Stop strings must not cut the reasoning, so they are matched here, after the
reasoning boundary is known: a probe ReasoningParser (the same rules as the response parser) tells where the
content starts, and text that could still be the start of a stop string is held back until it is decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from s1serve.engine.stop_strings import find_stop, open_stop_prefix
from s1serve.serve.parsers.reasoning import ReasoningParser
from s1serve.serve.parsers.response import ParsedOutput, ResponseDelta, ResponseParser


@dataclass
class ChoiceText:
    parser: ResponseParser
    stops: list[str]
    include_stop: bool
    probe: ReasoningParser | None = None
    text: str = ""  # the choice's output text, cut at a matched stop string
    released: int = 0  # text[:released] has been handed to the parser
    stopped: bool = False
    stop_string: str | None = None  # the stop string that matched, once `stopped`

    @classmethod
    def create(cls, parser: ResponseParser, stops: list[str] | None, include_stop: bool) -> "ChoiceText":
        probe = None
        if parser.reasoning is not None and stops:
            probe = parser.reasoning.fresh()
        return cls(parser, list(stops or []), include_stop, probe)

    def _content_start(self) -> int | None:
        if self.probe is None:
            return 0
        return self.probe.content_start

    def push(self, delta: str) -> ResponseDelta:
        """Adds engine text; returns what can be released now. Sets `stopped` when a stop string matched."""
        if self.stopped or not delta:
            return ResponseDelta()
        self.text += delta
        if self.probe is not None:
            self.probe.feed(delta)
        start = self._content_start()
        safe = len(self.text)
        if self.stops and start is not None:
            hit = find_stop(self.text, self.stops, max(start, self.released - max(map(len, self.stops))))
            if hit is not None:
                index, stop = hit
                self.text = self.text[: index + (len(stop) if self.include_stop else 0)]
                self.stopped = True
                self.stop_string = stop
                safe = len(self.text)
            else:
                held = open_stop_prefix(self.text[start:], self.stops)
                safe = max(len(self.text) - held, self.released)
        return self._release(safe)

    def _release(self, end: int) -> ResponseDelta:
        chunk = self.text[self.released : end]
        self.released = max(self.released, end)
        return self.parser.feed(chunk) if chunk else ResponseDelta()

    def finish(self) -> ResponseDelta:
        """Releases everything held back and flushes the parser (the last delta of a stream)."""
        return self._release(len(self.text)).then(self.parser.flush())

    def parsed(self, engine_reason: str | None) -> ParsedOutput:
        """The whole choice parsed at once (non-streamed responses)."""
        return self.parser.parse(self.text, "stop" if self.stopped else engine_reason)
