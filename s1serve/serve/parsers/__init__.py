"""Output parsers of the OpenAI-compatible server: reasoning split and tool calls, whole and streamed.

Per request: build a `ResponseParser` from a `ReasoningParser` (or None) and a `ToolCallParser` (or None), then
`parse(text, finish_reason)` a whole response or `feed(delta)` ... `flush()` a stream. Rules: docs/api.md.
"""

from s1serve.serve.parsers.reasoning import (
    THINK_END, THINK_START, ReasoningParser, ReasoningSplit, count_reasoning_tokens, prompt_opens_reasoning,
)
from s1serve.serve.parsers.registry import (
    REASONING_PARSER_NAMES, TOOL_CALL_PARSER_NAMES, ParserNameError, get_reasoning_parser, get_tool_call_parser,
)
from s1serve.serve.parsers.response import (
    ParsedOutput, ResponseDelta, ResponseParser, ToolCallDelta, final_finish_reason,
)
from s1serve.serve.parsers.tool_calls import (
    TOOL_CALL_END, TOOL_CALL_START, ContentDelta, ToolCall, ToolCallAbort, ToolCallArgs, ToolCallEnd,
    ToolCallParser, ToolCallStart, ToolEvent, new_call_id,
)

__all__ = [
    "THINK_END", "THINK_START", "TOOL_CALL_END", "TOOL_CALL_START",
    "ReasoningParser", "ReasoningSplit", "count_reasoning_tokens", "prompt_opens_reasoning",
    "ToolCallParser", "ToolCall", "ToolEvent", "ContentDelta", "ToolCallStart", "ToolCallArgs", "ToolCallEnd",
    "ToolCallAbort", "new_call_id",
    "ResponseParser", "ResponseDelta", "ToolCallDelta", "ParsedOutput", "final_finish_reason",
    "REASONING_PARSER_NAMES", "TOOL_CALL_PARSER_NAMES", "ParserNameError", "get_reasoning_parser",
    "get_tool_call_parser",
]
