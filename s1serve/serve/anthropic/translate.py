"""A Messages request -> the chat request it means, plus its reasoning budget.

`system` becomes the system message; user `text` / `image` blocks a user message (images as `image_url` parts, so
they take the chat path's image handling); each `tool_result` a tool message, which must answer a `tool_use` made
earlier in the conversation; assistant `text`, `thinking` and `tool_use` blocks one assistant message (content,
reasoning_content, tool_calls). The thinking switch follows Anthropic's default: off unless `thinking` is enabled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from s1serve.serve.anthropic.protocol import CountTokensRequest, MessagesRequest
from s1serve.serve.openai.errors import APIError
from s1serve.serve.openai.protocol import ChatCompletionRequest

USER_BLOCKS = ("text", "image", "tool_result")
ASSISTANT_BLOCKS = ("text", "thinking", "redacted_thinking", "tool_use")
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
REFUSED_FIELDS = ("container", "mcp_servers")  # server-side features this server does not have


@dataclass
class ChatTranslation:
    chat: ChatCompletionRequest
    reasoning_budget: int | None


def _bad(message: str) -> APIError:
    return APIError(400, message)


def _text(block: dict, where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad(f"{where}: a text block needs a string text")
    return text


def _image(block: dict, where: str) -> dict:
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    if source.get("type") == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise _bad(f"{where}: an image block needs source {{type: base64, media_type, data}} or {{type: url, url}}")
    return {"type": "image_url", "image_url": {"url": url}}


def _blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise _bad(f"{where}.content must be a string or a list of content blocks")
    return content


def _tool_result_content(block: dict, where: str) -> str | list[dict]:
    content = block.get("content", "")
    if isinstance(content, str):
        return content
    parts = []
    for k, part in enumerate(_blocks(content, where)):
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text(part, f"{where}.content[{k}]")})
        elif kind == "image":
            parts.append(_image(part, f"{where}.content[{k}]"))
        else:
            raise _bad(f"{where}.content[{k}]: block type {kind!r} is not supported in a tool_result; supported: text, image")
    return parts


def _user(content: Any, where: str, tool_use_ids: set[str]) -> list[dict]:
    messages: list[dict] = []
    parts: list[dict] = []
    for k, block in enumerate(_blocks(content, where)):
        at = f"{where}.content[{k}]"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(_image(block, at))
        elif kind == "tool_result":
            tool_use_id = block.get("tool_use_id")
            if tool_use_id not in tool_use_ids:
                raise _bad(f"{at}: tool_result names tool_use_id {tool_use_id!r}, which no earlier tool_use block made")
            if parts:
                messages.append({"role": "user", "content": parts})
                parts = []
            messages.append({"role": "tool", "tool_call_id": tool_use_id, "content": _tool_result_content(block, at)})
        else:
            raise _bad(f"{at}: block type {kind!r} is not supported in a user message; supported: {', '.join(USER_BLOCKS)}")
    if parts:
        messages.append({"role": "user", "content": parts})
    return messages


def _system_text(content: Any, where: str) -> str:
    """The text of `system` or of a system message: a string or text blocks (joined by newlines)."""
    blocks = _blocks(content, where)
    for k, block in enumerate(blocks):
        if block.get("type") != "text":
            raise _bad(f"{where}.content[{k}]: system text holds text blocks only, got {block.get('type')!r}")
    return "\n".join(_text(b, f"{where}.content[{k}]") for k, b in enumerate(blocks))


def _assistant(content: Any, where: str, tool_use_ids: set[str]) -> dict:
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict] = []
    for k, block in enumerate(_blocks(content, where)):
        at = f"{where}.content[{k}]"
        kind = block.get("type")
        if kind == "text":
            text.append(_text(block, at))
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise _bad(f"{at}: a thinking block needs a string thinking")
            reasoning.append(block["thinking"])
        elif kind == "redacted_thinking":
            continue  # nothing readable to give the model
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
            if not (isinstance(call_id, str) and call_id and isinstance(name, str) and name and isinstance(arguments, dict)):
                raise _bad(f"{at}: a tool_use block needs id and name (strings) and input (an object)")
            tool_use_ids.add(call_id)
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
        else:
            raise _bad(f"{at}: block type {kind!r} is not supported in an assistant message; supported: {', '.join(ASSISTANT_BLOCKS)}")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(req: CountTokensRequest) -> list[dict]:
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _system_text(req.system, "system")})
    tool_use_ids: set[str] = set()
    for i, message in enumerate(req.messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if role == "user":
            messages += _user(message.get("content"), where, tool_use_ids)
        elif role == "assistant":
            messages.append(_assistant(message.get("content"), where, tool_use_ids))
        elif role == "system":  # Claude Code sends system messages between turns
            messages.append({"role": "system", "content": _system_text(message.get("content"), where)})
        else:
            raise _bad(f"{where}.role must be 'user', 'assistant' or 'system', got {role!r}")
    return messages


def _tools(req: CountTokensRequest) -> list[dict] | None:
    if not req.tools:
        return None
    tools = []
    for k, tool in enumerate(req.tools):
        if tool.get("type", "custom") != "custom":
            raise _bad(f"tools[{k}]: tool type {tool.get('type')!r} is not supported; only client tools (name, input_schema) are")
        if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
            raise _bad(f"tools[{k}] needs a name (string) and an input_schema (object)")
        function = {"name": tool["name"], "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    return tools


def _validate(body: dict[str, Any]) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise _bad(f"{field or 'request'}: {first.get('msg', 'invalid value').removeprefix('Value error, ')}") from None


def _common(req: CountTokensRequest) -> dict[str, Any]:
    for name in REFUSED_FIELDS:
        if (req.model_extra or {}).get(name):
            raise _bad(f"{name} is not supported by this server")
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req), "tools": _tools(req)}
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise _bad("tool_choice of type 'tool' needs a name")
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            body["tool_choice"] = TOOL_CHOICES[choice.type]
        body["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    thinking = req.thinking is not None and req.thinking.type != "disabled"
    body["chat_template_kwargs"] = {"enable_thinking": thinking}
    return body


def count_request(req: CountTokensRequest) -> ChatCompletionRequest:
    return _validate(_common(req))


def to_chat(req: MessagesRequest) -> ChatTranslation:
    budget = None
    if req.thinking is not None and req.thinking.type == "enabled":
        budget = req.thinking.budget_tokens
        if budget is None:
            raise _bad("thinking.budget_tokens is required when thinking is enabled")
        if budget >= req.max_tokens:
            raise _bad(f"thinking.budget_tokens ({budget}) must be less than max_tokens ({req.max_tokens})")
    body = _common(req)
    body.update(max_tokens=req.max_tokens, stop=req.stop_sequences or None, temperature=req.temperature,
                top_p=req.top_p, top_k=req.top_k)
    return ChatTranslation(_validate(body), budget)
