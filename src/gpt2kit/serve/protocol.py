"""OpenAI request bodies as pydantic models: what is accepted, with the bounds OpenAI documents.

Unknown fields and NaN/infinite numbers are refused (`extra="forbid"`, `allow_inf_nan=False`); the app
turns every validation failure into a 400 in OpenAI's error shape naming the offending `param`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)

Number = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[StrictInt, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: StrictBool | None = None


class _Sampling(BaseModel):
    model_config = _CONFIG
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None  # vLLM's extension: -1 or 0 = off
    n: Annotated[StrictInt, Field(ge=1, le=16)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    user: StrictStr | None = None


class CompletionRequest(_Sampling):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1, max_length=64)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=64)]
    )
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: StrictBool | None = None


class ContentPart(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None


class TokenizeRequest(BaseModel):
    model_config = _CONFIG
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = _CONFIG
    model: StrictStr | None = None
    tokens: list[TokenId]
