"""Intern-S1 tokenizer: exact reference ids, streaming detokenizer, chat template."""

from s1serve.tokenizer.chat_template import ChatTemplate
from s1serve.tokenizer.detokenizer import IncrementalDetokenizer
from s1serve.tokenizer.errors import ChatTemplateError, InvalidTokenIdError, TokenizerError
from s1serve.tokenizer.loading import load_tokenizer
from s1serve.tokenizer.tokenizer import Tokenizer

__all__ = [
    "ChatTemplate",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "InvalidTokenIdError",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
]
