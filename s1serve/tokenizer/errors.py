"""Errors raised by the tokenizer package; all are user-facing (bad files, ids, text or messages)."""

from s1serve.errors import S1ServeError


class TokenizerError(S1ServeError, ValueError):
    """Tokenizer files are missing or malformed, or the input to encode/decode is invalid."""


class InvalidTokenIdError(TokenizerError):
    """A token id outside the vocabulary was given to decode or convert_ids_to_tokens."""


class ChatTemplateError(TokenizerError):
    """The chat template is missing, or rendering failed for the given messages."""
