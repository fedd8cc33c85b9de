"""The HTTP API: TabbyAPI's paths, bodies, statuses and error shapes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from tabby.auth import Authenticator, AuthKeys
from tabby.config import Config
from tabby.engines.base import ContextLengthError, Engine, GenerationChunk, LoadOptions, SamplingParams
from tabby.manager import LoadRequest, ModelManager
from tabby.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelLoadRequest,
    SamplingRequest,
    TokenDecodeRequest,
    TokenEncodeRequest,
)

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
    return SamplingParams(
        max_tokens=body.max_tokens or max(1, engine.max_seq_len - prompt_tokens),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        top_p=1.0 if body.top_p is None else body.top_p,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
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
        except Exception as exc:  # after the stream began, errors are one event (no [DONE])
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


async def until_disconnected(request: Request, work: asyncio.Task[Any]) -> Any:
    """Await `work`, cancelling it if the client goes away first."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=0.25)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            raise HTTPException(499, "Client disconnected")


def create_app(config: Config, keys: AuthKeys | None) -> FastAPI:
    auth = Authenticator(None if config.network.disable_auth else keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = ModelManager(config)
        app.state.manager = manager
        if config.model.model_name:
            app.state.startup_load = asyncio.create_task(startup_load(manager, config))
        yield
        await manager.shutdown()

    app = FastAPI(title="TabbyAPI", summary="Gantry's TabbyAPI-compatible model server", lifespan=lifespan)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"])

    def manager_of(request: Request) -> ModelManager:
        return request.app.state.manager  # type: ignore[no-any-return]

    def require_api(request: Request) -> None:
        auth.require_api(request)

    def require_admin(request: Request) -> None:
        auth.require_admin(request)

    api = [Depends(require_api)]
    admin = [Depends(require_admin)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "healthy", "issues": []}

    @app.get("/.well-known/serviceinfo")
    async def serviceinfo() -> dict[str, Any]:
        return SERVICE_INFO

    @app.get("/v1/auth/permission", dependencies=api)
    async def permission(request: Request) -> dict[str, str]:
        return {"permission": auth.permission(request)}

    async def list_models(request: Request) -> dict[str, Any]:
        manager = manager_of(request)
        names = list(config.model.dummy_model_names) if config.model.use_dummy_models else []
        if auth.permission(request) == "admin":
            names += manager.folder_names()
        elif manager.ready_engine is not None:
            names.append(manager.ready_engine.model_name)
        return {"object": "list", "data": [model_card(name) for name in names]}

    app.get("/v1/models", dependencies=api)(list_models)
    app.get("/v1/model/list", dependencies=api)(list_models)

    @app.get("/v1/model/draft/list", dependencies=api)
    async def draft_list() -> dict[str, Any]:
        return {"object": "list", "data": []}

    @app.get("/v1/model", dependencies=api)
    async def current_model(request: Request) -> dict[str, Any]:
        engine = manager_of(request).require_engine()
        return model_card(engine.model_name, engine.card_parameters(), with_logging=True)

    @app.get("/props", dependencies=api)
    async def props(request: Request) -> dict[str, Any]:
        engine = manager_of(request).require_engine()
        template = engine.card_parameters().get("prompt_template_content") or ""
        return {"total_slots": 1, "chat_template": template, "default_generation_settings": {"n_ctx": engine.max_seq_len}}

    @app.post("/v1/model/load", dependencies=admin)
    async def load_model(request: Request, body: ModelLoadRequest) -> EventSourceResponse:
        options = LoadOptions(
            max_seq_len=body.max_seq_len,
            cache_size=body.cache_size,
            cache_mode=body.cache_mode,
            chunk_size=body.chunk_size,
            rope_scale=body.rope_scale,
            rope_alpha=body.rope_alpha if isinstance(body.rope_alpha, float) else None,
            prompt_template=body.prompt_template,
            gpu_split_auto=body.gpu_split_auto,
            gpu_split=body.gpu_split,
            autosplit_reserve=body.autosplit_reserve,
            load_throttle_mbps=config.model.load_throttle_mbps if body.load_throttle_mbps is None else body.load_throttle_mbps,
        )
        events = manager_of(request).start_load(LoadRequest(body.model_name, options, body.backend))

        async def stream() -> AsyncIterator[str]:
            while (event := await events.get()) is not None:
                yield compact(event)

        return EventSourceResponse(stream(), ping=config.network.sse_ping_interval)

    @app.post("/v1/model/unload", dependencies=admin)
    async def unload_model(request: Request) -> None:
        await manager_of(request).unload()

    async def inline_load(request: Request, model: str | None) -> None:
        manager = manager_of(request)
        if not (config.model.inline_model_loading and model) or model not in manager.folder_names():
            return
        if manager.engine is not None and manager.engine.model_name == model:
            return
        if auth.keys is not None and auth.permission(request) != "admin":
            raise HTTPException(401, f"Unable to switch model to {model} because an admin key isn't provided")
        last = await manager.load_and_wait(LoadRequest(model, LoadOptions(load_throttle_mbps=config.model.load_throttle_mbps)))
        if "error" in last:
            raise HTTPException(503, f"Loading {model} failed: {last['error']['message']}")

    async def answer(request: Request, body: SamplingRequest, kind: str, prompt_of: Any, param: str) -> Any:
        await inline_load(request, body.model)
        manager = manager_of(request)
        engine = manager.require_engine()
        prompt_ids = engine.encode(prompt_of(engine), add_bos=body.add_bos_token is not False)
        if len(prompt_ids) >= engine.max_seq_len:
            return context_error(ContextLengthError(len(prompt_ids), engine.max_seq_len), param)
        generation = Generation(kind, body, engine, prompt_ids)
        if body.stream:
            return EventSourceResponse(held_stream(manager, generation), ping=config.network.sse_ping_interval)
        async with manager.generation():
            return await until_disconnected(request, asyncio.create_task(generation.complete()))

    async def held_stream(manager: ModelManager, generation: Generation) -> AsyncIterator[str]:
        # The body runs after the handler returned: the stream holds the model for its own lifetime
        # (and a stream that never starts holds nothing).
        try:
            async with manager.generation() as engine:
                if engine is not generation.engine:
                    raise HTTPException(503, "The model changed before the answer started.")
                async for item in generation.stream():
                    yield item
        except HTTPException as exc:
            yield compact({"error": {"message": exc.detail, "trace": None}})

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]

        def prompt_of(engine: Engine) -> str:
            return engine.render_chat(messages, bool(body.add_generation_prompt), body.template_vars)

        return await answer(request, body, "chat", prompt_of, "messages")

    @app.post("/v1/completions", dependencies=api)
    async def completions(request: Request, body: CompletionRequest) -> Any:
        prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
        return await answer(request, body, "text", lambda engine: prompt, "prompt")

    @app.post("/v1/token/encode", dependencies=api)
    async def token_encode(request: Request, body: TokenEncodeRequest) -> dict[str, Any]:
        engine = manager_of(request).require_engine()
        if isinstance(body.text, str):
            text = body.text
        else:
            text = engine.render_chat([{"role": m.role, "content": m.text()} for m in body.text], False)
        tokens = engine.encode(text, add_bos=body.add_bos_token, encode_special_tokens=body.encode_special_tokens)
        return {"tokens": tokens, "length": len(tokens)}

    @app.post("/v1/token/decode", dependencies=api)
    async def token_decode(request: Request, body: TokenDecodeRequest) -> dict[str, str]:
        engine = manager_of(request).require_engine()
        return {"text": engine.decode(body.tokens, decode_special_tokens=body.decode_special_tokens)}

    return app


async def startup_load(manager: ModelManager, config: Config) -> None:
    name = config.model.model_name
    try:
        last = await manager.load_and_wait(LoadRequest(name, LoadOptions(load_throttle_mbps=config.model.load_throttle_mbps)))
    except HTTPException as exc:
        log.error("Could not load %s at startup: %s", name, exc.detail)
        return
    if "error" in last:
        log.error("Could not load %s at startup: %s", name, last["error"]["message"])
