"""The OpenAI chat-completions wire format (the subset we serve) plus the ``autoselect`` extension.

Requests ignore fields we do not use (as OpenAI-compatible servers do), except ones whose
silent loss would change the answer (``n``, ``stop``, ``tools``), which are refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class AutoSelectOptions(BaseModel):
    """Per-request pruning: ``budget`` is an int K (tokens kept per image) or a ratio in (0, 1]."""

    model_config = ConfigDict(extra="forbid")
    budget: StrictInt | StrictFloat | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients send this instead
    temperature: float | None = Field(None, ge=0, le=2)  # 0: greedy; default 1 as in OpenAI
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    autoselect: AutoSelectOptions | None = None


# ---- responses ---------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int  # after pruning: what the LLM actually prefilled
    completion_tokens: int
    total_tokens: int


class AutoSelectUsage(BaseModel):
    visual_tokens_kept: int
    visual_tokens_total: int
    budget: int | float  # as requested (or the scorer's default)
    images: int
    scorer_version: str
    scorer_alias: str | None
    batch_size: int  # requests that shared the forward pass


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    autoselect: AutoSelectUsage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    autoselect: AutoSelectUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "autoselect"
    autoselect: dict[str, Any]  # backbone, scorer URI, resolved version and alias, default budget


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
