"""Request body of `POST /v1/responses` (pydantic). Input items stay dicts here: translate.py reads them one by
one so that an unsupported item or part is refused with its position and the kinds that are supported."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's effort levels. "none" and "minimal" turn the model's thinking off; the others leave it on (the model
# has one thinking mode, with no graded effort).
THINKING_OFF_EFFORTS = ("none", "minimal")
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # `summary` / `generate_summary`: no summaries are made

    effort: Optional[Effort] = None


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # `verbosity`: no effect on this model

    format: Optional[TextFormat] = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: bool = True
    reasoning: Optional[ReasoningConfig] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    text: Optional[TextConfig] = None
    stream: bool = False
    store: bool = True
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
