"""`store` / `previous_response_id`: the last stored responses, in memory, least recently used evicted first."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_CAPACITY = 1024


@dataclass(frozen=True)
class StoredResponse:
    response: dict  # the response object as it was returned
    messages: list[dict]  # the whole conversation as chat messages, this response's output last
    call_ids: frozenset[str]  # function call ids made in the conversation (a function_call_output must name one)


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"the response store needs a capacity of at least 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, entry: StoredResponse) -> None:
        self._entries[response_id] = entry
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry
