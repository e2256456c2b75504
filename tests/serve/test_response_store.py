"""The Responses API's in-memory store: bounded, least recently used evicted first; unknown ids are a 400."""

from __future__ import annotations

import pytest

from s1serve.serve.openai.errors import APIError
from s1serve.serve.responses.protocol import ResponsesRequest
from s1serve.serve.responses.store import ResponseStore, StoredResponse
from s1serve.serve.responses.translate import to_chat


def entry(n: int) -> StoredResponse:
    messages = [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": None,
                "tool_calls": [{"id": f"call_{n}", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    return StoredResponse({"id": f"resp_{n}"}, messages, frozenset({f"call_{n}"}))


def test_least_recently_used_is_evicted():
    store = ResponseStore(capacity=2)
    store.put("resp_1", entry(1))
    store.put("resp_2", entry(2))
    assert store.get("resp_1") is not None  # now resp_2 is the least recently used
    store.put("resp_3", entry(3))
    assert store.get("resp_2") is None and store.get("resp_1") is not None and store.get("resp_3") is not None
    with pytest.raises(ValueError):
        ResponseStore(capacity=0)


def test_previous_response_continues_its_conversation_and_unknown_ids_are_a_400():
    store = ResponseStore(capacity=1)
    store.put("resp_1", entry(1))
    output = {"type": "function_call_output", "call_id": "call_1", "output": "20"}
    chat = to_chat(ResponsesRequest(input=[output], previous_response_id="resp_1"), store).chat
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool"]
    assert chat.messages[2].tool_call_id == "call_1"
    store.put("resp_2", entry(2))  # evicts resp_1
    with pytest.raises(APIError) as error:
        to_chat(ResponsesRequest(input=[output], previous_response_id="resp_1"), store)
    assert error.value.status == 400 and error.value.param == "previous_response_id"
    assert "unknown or was evicted" in error.value.message and "last 1 responses" in error.value.message
    with pytest.raises(APIError, match="call_1"):  # the call is not in resp_2's conversation
        to_chat(ResponsesRequest(input=[output], previous_response_id="resp_2"), store)
