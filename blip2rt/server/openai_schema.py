"""The request body of POST /v1/chat/completions, following OpenAI's, as pydantic models: FastAPI
validates against them and publishes them in the server's OpenAPI schema. Responses are built as
plain dicts in OpenAI's shapes (responses.py)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_MESSAGES = 256  # a longer conversation is refused (BLIP-2 reads the last turn with an image)


class ImageURL(BaseModel):
    url: str = Field(description="a data: URL (PNG, JPEG or WebP, base64); http(s) and local paths only where "
                                 "the server allows them")
    detail: str | None = None  # accepted and ignored: BLIP-2 reads every image at its one resolution


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, ...: not used by BLIP-2

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI options are ignored, as OpenAI-compatible servers do

    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0, description="blip2rt's extension: no end of text before this many "
                                                             "tokens (default: the model's caption or VQA minimum)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int | None = Field(None, ge=1, le=1, description="one choice per image; n > 1 is not supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
