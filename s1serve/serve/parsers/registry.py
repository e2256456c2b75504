"""CLI parser names -> parser classes.

Intern-S1-Pro has one output format (`<think>` reasoning, Qwen-style `<tool_call>` JSON blocks), so every name
the reference frameworks use for it maps to the same class. Names are matched case-insensitively, with `-` and
`_` treated alike (`deepseek-r1` = `deepseek_r1`, `intern_s1` = `intern-s1`).
"""

from __future__ import annotations

from s1serve.errors import S1ServeError
from s1serve.serve.parsers.reasoning import ReasoningParser
from s1serve.serve.parsers.tool_calls import ToolCallParser

# LMDeploy `intern-s1`, vLLM `deepseek_r1`, SGLang `qwen3` and its `interns1` alias.
REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "intern-s1": ReasoningParser,
    "interns1": ReasoningParser,
    "deepseek_r1": ReasoningParser,
    "qwen3": ReasoningParser,
}
# LMDeploy `qwen3`/`qwen`, vLLM `hermes`, SGLang `qwen`/`qwen25`. LMDeploy's `intern-s1` and SGLang's `interns1`
# name the first Intern-S1's action-tag format, which Intern-S1-Pro does not emit; accepted as the same parser.
TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "qwen3": ToolCallParser,
    "hermes": ToolCallParser,
    "qwen": ToolCallParser,
    "qwen25": ToolCallParser,
    "intern-s1": ToolCallParser,
    "interns1": ToolCallParser,
}
REASONING_PARSER_NAMES = tuple(REASONING_PARSERS)
TOOL_CALL_PARSER_NAMES = tuple(TOOL_CALL_PARSERS)


class ParserNameError(S1ServeError, ValueError):
    """An unknown --reasoning-parser / --tool-call-parser name."""


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _lookup(kind: str, flag: str, table: dict, name: str):
    wanted = _normalize(name)
    for known, cls in table.items():
        if _normalize(known) == wanted:
            return cls
    raise ParserNameError(f"unknown {kind} {name!r} for {flag}; choose one of: {', '.join(table)}")


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    return _lookup("reasoning parser", "--reasoning-parser", REASONING_PARSERS, name)


def get_tool_call_parser(name: str) -> type[ToolCallParser]:
    return _lookup("tool-call parser", "--tool-call-parser", TOOL_CALL_PARSERS, name)
