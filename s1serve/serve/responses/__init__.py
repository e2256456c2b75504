"""The OpenAI Responses API (`POST /v1/responses`) over the chat path: docs/api.md, "Responses API"."""
