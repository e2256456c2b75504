"""Request and response bodies of the OpenAI-compatible API (pydantic), with the extra fields vLLM/LMDeploy take.

Validation here covers types and ranges; checks that need the model (context length, tool names) live in the
serving code. Unset sampling fields stay None so that the checkpoint's generation_config.json fills them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


# Caps on what one request may ask for, each answered 400 naming it (prompt length, n and logprobs are checked
# against the engine's own limits: --max-model-len, --max-num-seqs, 20 top logprobs as in OpenAI's API).
MAX_STOP_STRINGS = 32  # OpenAI allows 4; agents send a few more, so a generous bound that still caps the search
MAX_STOP_CHARS = 512  # characters of one stop string
MAX_TOOLS = 128  # OpenAI's cap on functions in one request


def random_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    include_usage: bool = False


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None

    @field_validator("parameters")
    @classmethod
    def _schema_is_object(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError("function parameters must be a JSON Schema of type 'object'")
        return value


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and not (self.json_schema and isinstance(self.json_schema.get("schema"), dict)):
            raise ValueError("response_format json_schema needs json_schema.schema (an object)")
        return self


class SamplingFields(BaseModel):
    """Fields shared by chat and completion requests."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=-1)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**63 - 1)  # a 64-bit signed integer, as vLLM's
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Off by default: added tokens such as </think> and <tool_call> are written by the model with the spacing it
    # chose; a space inserted around them would land in content and reasoning (" \n\n" instead of null).
    spaces_between_special_tokens: bool = False
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[str, float]] = None  # token id (as a JSON key) -> bias in [-100, 100]
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids in the response
    prompt_logprobs: Optional[int] = None  # vLLM's: each prompt token's logprob and the top k (0..20, SamplingParams)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if any(s == "" for s in stops):
            raise ValueError("stop cannot contain an empty string")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        longest = max(stops, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {len(longest)}")
        return stops


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Tool]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True
    response_format: Optional[ResponseFormat] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: bool = True
    echo: bool = False  # vLLM's (the last message echoed); refused with a 400
    mm_processor_kwargs: Optional[dict[str, Any]] = None  # fps / num_frames (video), min_pixels / max_pixels (image)

    @model_validator(mode="after")
    def _tool_choice_matches_tools(self) -> "ChatCompletionRequest":
        names = {t.function.name for t in self.tools or []}
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names function '{self.tool_choice.function.name}', which is not among the request's tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs at least one tool")
        return self

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_tokens if self.max_tokens is not None else 16


class TokenizeRequest(BaseModel):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model: Optional[str] = None
    tokens: list[int]
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = False  # so that /tokenize and /detokenize round-trip


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    completion_tokens_details: Optional[dict[str, int]] = None
    prompt_tokens_details: Optional[dict[str, int]] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "s1serve"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
