"""Render a checkpoint's Jinja chat template the way transformers' `apply_chat_template` does.

Same environment: sandboxed and immutable, trim_blocks and lstrip_blocks, loop controls, a `tojson` that keeps
non-ASCII characters and HTML characters as they are, `raise_exception` and `strftime_now`, the
`{% generation %}` block (rendered as its body), and the tokenizer's special tokens as variables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from s1serve.tokenizer.errors import ChatTemplateError


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from exc


class ChatTemplate:
    """One template, or several by name (as tokenizer_config.json may store them: "default", "tool_use")."""

    def __init__(self, source: str | Mapping[str, str]) -> None:
        sources = {"default": source} if isinstance(source, str) else dict(source)
        self._templates = {name: _compile(text) for name, text in sources.items()}

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Messages (OpenAI-style dicts: role, content as text or parts, tool_calls, reasoning_content, ...)
        -> prompt text. A `content` of None (an assistant turn holding only tool calls) renders as empty
        text, where transformers would fail on it."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise ChatTemplateError("messages must be a non-empty list of message objects")
        for n, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise ChatTemplateError(f"message {n} must be an object with a 'role'")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ChatTemplateError("tools must be a list of JSON-schema objects")
        template = self._pick(tools)
        chat = [
            {**m, "content": ""} if "content" in m and m["content"] is None else m for m in messages
        ]
        try:
            return template.render(
                messages=chat,
                tools=list(tools) if tools is not None else None,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template rejected the conversation: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise ChatTemplateError(f"chat template failed on the conversation: {exc!r}") from exc

    def _pick(self, tools: Sequence[Mapping[str, Any]] | None) -> jinja2.Template:
        if len(self._templates) == 1:
            return next(iter(self._templates.values()))
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise ChatTemplateError(f"no 'default' chat template among {sorted(self._templates)}")
