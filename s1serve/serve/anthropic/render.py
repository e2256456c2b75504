"""Blocks -> Anthropic content blocks, the message object, and the streamed event sequence.

Reasoning becomes `thinking` blocks with a `signature`, text `text` blocks, calls `tool_use` blocks (`input` is
the parsed arguments). Streamed: `message_start`, `ping`, per block `content_block_start`, its deltas
(`thinking_delta`, `text_delta`, `input_json_delta` whose `partial_json` pieces concatenate to the arguments),
for a thinking block a `signature_delta`, `content_block_stop`; then `message_delta` (stop_reason, stop_sequence,
usage) and `message_stop`.

The signature is an HMAC of the thinking text under a key made when the process starts: opaque to clients, as
Anthropic's are, so that clients which require one get one. Thinking blocks sent back are used as written; their
signature is not checked.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

from s1serve.serve.blocks import REASONING, TEXT, Block, BlockDelta, BlockEvent, BlockStart, BlockStop

_SIGNING_KEY = secrets.token_bytes(32)


def signature(thinking: str) -> str:
    return base64.b64encode(hmac.new(_SIGNING_KEY, thinking.encode(), hashlib.sha256).digest()).decode()


def block_json(block: Block) -> dict:
    if block.kind == REASONING:
        return {"type": "thinking", "thinking": block.text, "signature": signature(block.text)}
    if block.kind == TEXT:
        return {"type": "text", "text": block.text}
    return {"type": "tool_use", "id": block.call_id, "name": block.name, "input": json.loads(block.text or "{}")}


def stop_reason(finish_reason: str | None, stop_string: str | None) -> str:
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_string is not None else "end_turn"


def usage_json(chat_usage: dict) -> dict:
    """Anthropic's split of the prompt: `input_tokens` are those computed, `cache_read_input_tokens` those the
    prefix cache held (their sum is the whole prompt)."""
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"] - cached, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, "output_tokens": chat_usage["completion_tokens"]}


class MessageRenderer:
    """One message: block events in, Anthropic stream events out; `final()` is the finished message object,
    the same whether or not the events were sent."""

    def __init__(self, message_id: str, model: str):
        self.message_id = message_id
        self.model = model

    def _message(self, content: list[dict], reason: str | None, stop_string: str | None, usage: dict) -> dict:
        return {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": reason, "stop_sequence": stop_string, "usage": usage}

    def start(self, prompt_tokens: int) -> list[dict]:
        return [{"type": "message_start",
                 "message": self._message([], None, None, {"input_tokens": prompt_tokens, "output_tokens": 0})},
                {"type": "ping"}]

    def events(self, event: BlockEvent, blocks: list[Block]) -> list[dict]:
        block = blocks[event.index]
        if isinstance(event, BlockStart):
            if block.kind == REASONING:
                start: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
            elif block.kind == TEXT:
                start = {"type": "text", "text": ""}
            else:
                start = {"type": "tool_use", "id": block.call_id, "name": block.name, "input": {}}
            return [{"type": "content_block_start", "index": event.index, "content_block": start}]
        if isinstance(event, BlockDelta):
            if block.kind == REASONING:
                delta = {"type": "thinking_delta", "thinking": event.text}
            elif block.kind == TEXT:
                delta = {"type": "text_delta", "text": event.text}
            else:
                delta = {"type": "input_json_delta", "partial_json": event.text}
            return [{"type": "content_block_delta", "index": event.index, "delta": delta}]
        assert isinstance(event, BlockStop)
        out = []
        if block.kind == REASONING:
            out.append({"type": "content_block_delta", "index": event.index,
                        "delta": {"type": "signature_delta", "signature": signature(block.text)}})
        return out + [{"type": "content_block_stop", "index": event.index}]

    def final(self, blocks: list[Block], finish_reason: str | None, stop_string: str | None, chat_usage: dict) -> dict:
        """The finished message; announced calls that did not complete are left out."""
        content = [block_json(b) for b in blocks if b.completed]
        return self._message(content, stop_reason(finish_reason, stop_string), stop_string, usage_json(chat_usage))

    def end(self, message: dict) -> list[dict]:
        return [{"type": "message_delta",
                 "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
                 "usage": message["usage"]},
                {"type": "message_stop"}]
