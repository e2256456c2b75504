"""The Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over the chat path:
docs/api.md, "Messages API"."""
