"""Blocks -> Responses output items, the response object, and the streamed event sequence.

Reasoning blocks become `reasoning` items (their text as one `reasoning_text` part), text blocks `message` items
(one `output_text` part), tool-call blocks `function_call` items. Streamed: `response.created`,
`response.in_progress`, then per item `output_item.added`, its part's `content_part.added`, text / reasoning /
argument deltas and their `.done`, `content_part.done`, `output_item.done`, and last `response.completed` (or
`response.incomplete` when max_output_tokens cut the output) carrying the same response object a non-streamed
request returns.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from s1serve.serve.blocks import REASONING, TEXT, Block, BlockDelta, BlockEvent, BlockStart, BlockStop
from s1serve.serve.responses.protocol import ResponsesRequest

ITEM_PREFIX = {REASONING: "rs_", TEXT: "msg_", "tool_call": "fc_"}


def random_item_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def item_json(block: Block, item_id: str, status: str) -> dict:
    """The item of a block; an `in_progress` item is the empty one `output_item.added` announces."""
    done = status != "in_progress"
    if block.kind == REASONING:
        return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": block.text}] if done else []}
    if block.kind == TEXT:
        return {"id": item_id, "type": "message", "role": "assistant", "status": status,
                "content": [_text_part(block.text)] if done else []}
    return {"id": item_id, "type": "function_call", "status": status, "call_id": block.call_id, "name": block.name,
            "arguments": block.text if done else ""}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _part(block: Block, text: str) -> dict:
    return {"type": "reasoning_text", "text": text} if block.kind == REASONING else _text_part(text)


def usage_json(chat_usage: dict) -> dict:
    details = chat_usage.get("completion_tokens_details") or {}
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens", 0)},
        "total_tokens": chat_usage["total_tokens"],
    }


def status_of(finish_reason: str | None) -> tuple[str, dict | None]:
    """(status, incomplete_details) of a response that ended with this chat finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason in ("stop", "tool_calls"):
        return "completed", None
    return "incomplete", None


def response_json(
    req: ResponsesRequest, response_id: str, model: str, created_at: int, status: str, output: list[dict],
    usage: dict | None, incomplete_details: dict | None = None,
) -> dict:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": model,
        "output": output,
        "error": None,
        "incomplete_details": incomplete_details,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
        "store": req.store,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
        if req.text and req.text.format else {"format": {"type": "text"}},
        "tool_choice": req.tool_choice or "auto",
        "tools": req.tools or [],
        "truncation": "disabled",
        "usage": usage,
        "metadata": req.metadata or {},
        "user": req.user,
    }


class ResponseRenderer:
    """One response: block events in, Responses stream events out; `final()` is the finished response object,
    the same whether or not the events were sent."""

    def __init__(self, req: ResponsesRequest, response_id: str, model: str,
                 item_id: Callable[[str], str] = random_item_id):
        self.req = req
        self.response_id = response_id
        self.model = model
        self.created_at = int(time.time())
        self._item_id = item_id
        self._ids: dict[int, str] = {}  # block index -> item id
        self._seq = 0

    def _event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def start(self) -> list[dict]:
        snapshot = response_json(self.req, self.response_id, self.model, self.created_at, "in_progress", [], None)
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def item_ids(self, blocks: list[Block]) -> None:
        """Gives ids to blocks never streamed (a non-streamed response)."""
        for index, block in enumerate(blocks):
            self._ids.setdefault(index, self._item_id(ITEM_PREFIX[block.kind]))

    def events(self, event: BlockEvent, blocks: list[Block]) -> list[dict]:
        index = event.index
        block = blocks[index]
        if isinstance(event, BlockStart):
            item_id = self._ids[index] = self._item_id(ITEM_PREFIX[block.kind])
            out = [self._event("response.output_item.added", output_index=index, item=item_json(block, item_id, "in_progress"))]
            if block.kind == "tool_call":
                return out
            return out + [self._event("response.content_part.added", item_id=item_id, output_index=index,
                                      content_index=0, part=_part(block, ""))]
        item_id = self._ids[index]
        if isinstance(event, BlockDelta):
            if block.kind == "tool_call":
                return [self._event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                                    delta=event.text)]
            kind = "response.reasoning_text.delta" if block.kind == REASONING else "response.output_text.delta"
            fields: dict[str, Any] = {"item_id": item_id, "output_index": index, "content_index": 0, "delta": event.text}
            if block.kind == TEXT:
                fields["logprobs"] = []
            return [self._event(kind, **fields)]
        assert isinstance(event, BlockStop)
        if block.kind == "tool_call":
            out = [self._event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                               name=block.name, arguments=block.text)]
        else:
            kind = "response.reasoning_text.done" if block.kind == REASONING else "response.output_text.done"
            fields = {"item_id": item_id, "output_index": index, "content_index": 0, "text": block.text}
            if block.kind == TEXT:
                fields["logprobs"] = []
            out = [self._event(kind, **fields),
                   self._event("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                               part=_part(block, block.text))]
        status = "completed" if block.completed else "incomplete"
        return out + [self._event("response.output_item.done", output_index=index, item=item_json(block, item_id, status))]

    def final(self, blocks: list[Block], finish_reason: str | None, chat_usage: dict) -> dict:
        """The finished response object. `blocks` are the builder's blocks; announced calls that did not complete
        are left out (as in a non-streamed chat completion)."""
        self.item_ids(blocks)
        status, details = status_of(finish_reason)
        output = [item_json(b, self._ids[i], "completed") for i, b in enumerate(blocks) if b.completed]
        return response_json(self.req, self.response_id, self.model, self.created_at, status, output,
                             usage_json(chat_usage), details)

    def error(self, status: int, message: str, param: str | None) -> dict:
        """The `error` event of a stream that failed after it started."""
        return self._event("error", code=str(status), message=message, param=param)

    def end(self, response: dict) -> dict:
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return self._event(kind, response=response)
