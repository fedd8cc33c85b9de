"""Request and response bodies, with TabbyAPI's field names. Unknown request fields are ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

PositiveInt = Annotated[int, Field(gt=0)]


class ModelLoadRequest(BaseModel):
    model_name: str
    backend: str | None = None
    max_seq_len: PositiveInt | None = None
    cache_size: PositiveInt | None = None
    cache_mode: str | None = None
    chunk_size: PositiveInt | None = None
    rope_scale: float | None = None
    rope_alpha: float | Literal["auto"] | None = None
    gpu_split_auto: bool | None = None
    gpu_split: list[float] | None = None
    autosplit_reserve: list[float] | None = None
    prompt_template: str | None = None
    vision: bool | None = None
    draft_model: dict[str, Any] | None = None
    skip_queue: bool | None = False
    # Gantry's server only: simulate a disk of this many MB/s for this load (demos and tests).
    load_throttle_mbps: Annotated[float, Field(ge=0)] | None = None


class ChatMessagePart(BaseModel):
    type: str = "text"
    text: str | None = None


class ChatMessage(BaseModel):
    role: str = "user"
    content: str | list[ChatMessagePart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class SamplingRequest(BaseModel):
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    stop: str | list[str | int] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_k: int | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    penalty_range: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    ban_eos_token: bool | None = None
    add_bos_token: bool | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    add_generation_prompt: bool | None = True
    template_vars: dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


class TokenEncodeRequest(BaseModel):
    text: str | list[ChatMessage]
    add_bos_token: bool = True
    encode_special_tokens: bool = True
    decode_special_tokens: bool = True


class TokenDecodeRequest(BaseModel):
    tokens: list[int]
    add_bos_token: bool = True
    encode_special_tokens: bool = True
    decode_special_tokens: bool = True
