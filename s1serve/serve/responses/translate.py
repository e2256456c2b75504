"""A Responses request -> the chat request it means (messages, tools, tool_choice, sampling, response_format).

Input items become chat messages: message items keep their role (developer becomes system, which is what the chat
template knows), text parts become text, `input_image` parts become `image_url` parts (so they take the chat
path's image handling), consecutive `function_call` items (and a `reasoning` item before them) join one assistant
message, `function_call_output` items become tool messages and must answer a call made earlier in the
conversation. A stored previous response's conversation comes first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from s1serve.serve.openai.errors import APIError
from s1serve.serve.openai.protocol import ChatCompletionRequest
from s1serve.serve.responses.protocol import THINKING_OFF_EFFORTS, ResponsesRequest
from s1serve.serve.responses.store import ResponseStore

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
REFUSED_FIELDS = ("background", "conversation", "prompt")  # server-side features this server does not have


@dataclass
class ChatTranslation:
    chat: ChatCompletionRequest
    messages: list[dict]  # the conversation so far (input side), to store with the output
    call_ids: frozenset[str]


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param)


def _content(content: Any, where: str) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    parts: list[dict] = []
    for k, part in enumerate(content):
        at = f"{where}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            text = part.get("refusal") if kind == "refusal" else part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{at} ({kind}) needs a string text", at)
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise _bad(f"{at}: input_image needs image_url (an http(s) or data: URL); file_id is not supported", at)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise _bad(
                f"{at}: content part type {kind!r} is not supported; supported: {', '.join(TEXT_PARTS)}, input_image",
                at,
            )
    return parts


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    parts = _content(output, where)
    if any(p["type"] != "text" for p in parts):
        raise _bad(f"{where}.output: only text parts are supported in a function call output", f"{where}.output")
    return "".join(p["text"] for p in parts)


def input_messages(req: ResponsesRequest, known_call_ids: frozenset[str]) -> tuple[list[dict], frozenset[str]]:
    """The request's instructions and input as chat messages, and the call ids known after them."""
    messages: list[dict] = []
    calls = set(known_call_ids)
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    reasoning: str | None = None  # a reasoning item waiting for the assistant message it belongs to
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = ROLES.get(item.get("role"))
            if role is None:
                raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got {item.get('role')!r}", f"{where}.role")
            message: dict[str, Any] = {"role": role, "content": _content(item.get("content"), where)}
            if role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            if not (isinstance(call_id, str) and call_id and isinstance(name, str) and name and isinstance(arguments, str)):
                raise _bad(f"{where}: a function_call item needs call_id, name and arguments (strings)", where)
            try:
                json.loads(arguments)
            except ValueError:
                raise _bad(f"{where}.arguments is not valid JSON", f"{where}.arguments") from None
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or reasoning is not None:
                last = {"role": "assistant", "content": None}
                if reasoning is not None:
                    last["reasoning_content"], reasoning = reasoning, None
                messages.append(last)
            last.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            )
            calls.add(call_id)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in calls:
                raise _bad(
                    f"{where}: function_call_output names call_id {call_id!r}, which no earlier function_call in this "
                    "conversation made",
                    f"{where}.call_id",
                )
            messages.append({"role": "tool", "tool_call_id": call_id, "content": _output_text(item.get("output"), where)})
        elif kind == "reasoning":
            texts = item.get("content") or item.get("summary") or []
            if not isinstance(texts, list):
                raise _bad(f"{where}: reasoning content must be a list of reasoning_text parts", where)
            reasoning = "".join(t.get("text", "") for t in texts if isinstance(t, dict))
        else:
            raise _bad(f"{where}: item type {kind!r} is not supported; supported: {', '.join(ITEM_TYPES)}", f"{where}.type")
    return messages, frozenset(calls)


def _tools(req: ResponsesRequest) -> list[dict] | None:
    if not req.tools:
        return None
    tools = []
    for k, tool in enumerate(req.tools):
        if tool.get("type") != "function":
            raise _bad(f"tools[{k}]: tool type {tool.get('type')!r} is not supported; only 'function' tools are", f"tools[{k}].type")
        function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(req: ResponsesRequest) -> str | dict | None:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}", "tool_choice")


def _response_format(req: ResponsesRequest) -> dict | None:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise _bad("text.format json_schema needs a schema (an object)", "text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_}}


def to_chat(req: ResponsesRequest, store: ResponseStore) -> ChatTranslation:
    for name in REFUSED_FIELDS:
        if (req.model_extra or {}).get(name):
            raise _bad(f"{name} is not supported by this server", name)
    history: list[dict] = []
    known: frozenset[str] = frozenset()
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id)
        if previous is None:
            raise _bad(
                f"previous_response_id {req.previous_response_id!r} is unknown or was evicted: this server keeps the "
                f"last {store.capacity} responses created with store=true, in memory",
                "previous_response_id",
            )
        history, known = list(previous.messages), previous.call_ids
    messages, call_ids = input_messages(req, known)
    messages = history + messages
    if not messages:
        raise _bad("input is empty", "input")
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "tools": _tools(req),
        "tool_choice": _tool_choice(req),
        "parallel_tool_calls": req.parallel_tool_calls,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "response_format": _response_format(req),
    }
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["chat_template_kwargs"] = {"enable_thinking": req.reasoning.effort not in THINKING_OFF_EFFORTS}
    try:
        chat = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise _bad(f"{field or 'request'}: {first.get('msg', 'invalid value').removeprefix('Value error, ')}", field or None) from None
    return ChatTranslation(chat, messages, call_ids)
