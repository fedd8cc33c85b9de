"""What the HTTP API answers with: model cards, sampling settings, usage and the completion bodies.

Kept apart from the routes so the shapes TabbyAPI's clients parse live in one place, whatever path
serves them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse

from tabby.engines.base import ContextLengthError, Engine, GenerationChunk, SamplingParams, read_sampling_defaults
from tabby.schemas import SamplingRequest

log = logging.getLogger("tabby")

SERVICE_INFO = {
    "version": 0.1,
    "software": {
        "name": "TabbyAPI",
        "repository": "https://github.com/theroyallab/tabbyAPI",
        "homepage": "https://github.com/theroyallab/tabbyAPI",
    },
    "api": {
        "openai": {"name": "OpenAI API", "relative_url": "/v1", "documentation": "https://theroyallab.github.io/tabbyAPI", "version": 1},
        "koboldai": {"name": "KoboldAI API", "relative_url": "/api", "documentation": "https://theroyallab.github.io/tabbyAPI", "version": 1},
    },
}


def compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def model_card(name: str, parameters: dict[str, Any] | None = None, with_logging: bool = False) -> dict[str, Any]:
    logging_config = {"log_prompt": False, "log_generation_params": False, "log_requests": False} if with_logging else None
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "tabbyAPI",
        "logging": logging_config,
        "parameters": parameters,
    }


def sampling_params(body: SamplingRequest, engine: Engine, prompt_tokens: int) -> SamplingParams:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    model = read_sampling_defaults(engine.model_dir)  # where the request sets nothing
    return SamplingParams(
        max_tokens=body.max_tokens or max(1, engine.max_seq_len - prompt_tokens),
        temperature=model.get("temperature", 1.0) if body.temperature is None else body.temperature,
        top_k=int(model.get("top_k", 0)) if body.top_k is None else body.top_k,
        top_p=model.get("top_p", 1.0) if body.top_p is None else body.top_p,
        min_p=model.get("min_p", 0.0) if body.min_p is None else body.min_p,
        repetition_penalty=body.repetition_penalty or model.get("repetition_penalty", 1.0),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        penalty_range=-1 if body.penalty_range is None else body.penalty_range,
        stop=[s for s in stops if isinstance(s, str) and s],
        stop_token_ids=[s for s in stops if isinstance(s, int)],
        ban_eos_token=bool(body.ban_eos_token),
        seed=body.seed,
        min_tokens=body.min_tokens or 0,
    )


def usage(chunk: GenerationChunk, prompt_time: float, total_time: float) -> dict[str, Any]:
    completion_time = max(total_time - prompt_time, 1e-9)
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "prompt_time": round(prompt_time, 4),
        "prompt_tokens_per_sec": round(chunk.prompt_tokens / max(prompt_time, 1e-9), 2),
        "completion_tokens": chunk.completion_tokens,
        "completion_time": round(completion_time, 4),
        "completion_tokens_per_sec": round(chunk.completion_tokens / completion_time, 2),
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
        "total_time": round(total_time, 4),
    }


def context_error(exc: ContextLengthError, param: str) -> JSONResponse:
    # OpenAI's shape, which clients (and TabbyAPI's OpenAI error mode) use for this case.
    error = {"message": str(exc), "type": "invalid_request_error", "param": param, "code": "context_length_exceeded"}
    return JSONResponse(status_code=400, content={"error": error, "detail": str(exc)})


class Generation:
    """One completion request: its prompt, its parameters and how to shape its chunks."""

    def __init__(self, kind: str, body: SamplingRequest, engine: Engine, prompt_ids: list[int]) -> None:
        self.kind = kind  # "chat" or "text"
        self.body = body
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = sampling_params(body, engine, len(prompt_ids))
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.first_token_at: float | None = None

    def timing(self, chunk: GenerationChunk) -> dict[str, Any]:
        now = time.perf_counter()
        return usage(chunk, (self.first_token_at or now) - self.started, now - self.started)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        async for chunk in self.engine.generate(self.prompt_ids, self.params):
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            yield chunk

    def choice(self, text: str, chunk: GenerationChunk | None, streaming: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": chunk.finish_reason if chunk else None}
        if chunk is not None and chunk.finish_reason:
            choice["stop_str"] = chunk.stop_str
        if self.kind == "chat":
            key = "delta" if streaming else "message"
            choice[key] = ({"content": text} if text else {}) if streaming else {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        return choice

    def envelope(self, choices: list[dict[str, Any]], streaming: bool) -> dict[str, Any]:
        obj = {"chat": ("chat.completion.chunk", "chat.completion"), "text": ("text_completion", "text_completion")}[self.kind]
        return {
            "id": self.id,
            "choices": choices,
            "created": self.created,
            "model": self.engine.model_name,
            "object": obj[0] if streaming else obj[1],
        }

    async def stream(self) -> AsyncIterator[str]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            async for chunk in self.chunks():
                if chunk.text:
                    yield compact(self.envelope([self.choice(chunk.text, None, True)], True))
                if chunk.finish_reason:
                    last = self.envelope([self.choice("", chunk, True)], True)
                    if include_usage:
                        last["usage"] = self.timing(chunk)
                    yield compact(last)
            yield "[DONE]"
        except Exception as exc:  # noqa: BLE001  after the stream began, any error is one event (no [DONE])
            log.warning("Generation failed: %s", exc)
            yield compact({"error": {"message": str(exc) or type(exc).__name__, "trace": None}})

    async def complete(self) -> dict[str, Any]:
        parts: list[str] = []
        last: GenerationChunk | None = None
        async for chunk in self.chunks():
            parts.append(chunk.text)
            last = chunk
        assert last is not None
        body = self.envelope([self.choice("".join(parts), last, False)], False)
        body["usage"] = self.timing(last)
        return body
