"""The HTTP API's paths: TabbyAPI's paths, bodies, statuses and error shapes.

The handlers find the server's parts on `request.app.state` (set by `tabby.app`): `config`, `auth`,
and `manager` once the app has started. The manager's own errors become HTTP answers in the app's
exception handler; only what is HTTP's alone (keys, a client that went away) is an HTTPException here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from sse_starlette import EventSourceResponse

from tabby.auth import Authenticator
from tabby.config import Config
from tabby.engines.base import ContextLengthError, Engine, ModelFolderError
from tabby.errors import ModelUnavailableError, PromptError, TabbyError, UnsupportedLoadOptionError
from tabby.manager import LoadRequest, ModelManager
from tabby.responses import SERVICE_INFO, Generation, compact, context_error, model_card
from tabby.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelLoadRequest,
    SamplingRequest,
    TokenDecodeRequest,
    TokenEncodeRequest,
)
from tabby.templating import ChatTemplateError

log = logging.getLogger("tabby")


def manager_of(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.manager
    return manager


def config_of(request: Request) -> Config:
    config: Config = request.app.state.config
    return config


def auth_of(request: Request) -> Authenticator:
    auth: Authenticator = request.app.state.auth
    return auth


def require_api(request: Request) -> None:
    auth_of(request).require_api(request)


def require_admin(request: Request) -> None:
    auth_of(request).require_admin(request)


API = [Depends(require_api)]
ADMIN = [Depends(require_admin)]

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, Any]:
    return {"status": "healthy", "issues": []}


@router.get("/.well-known/serviceinfo")
async def serviceinfo() -> dict[str, Any]:
    return SERVICE_INFO


@router.get("/v1/auth/permission", dependencies=API)
async def permission(request: Request) -> dict[str, str]:
    return {"permission": auth_of(request).permission(request)}


# Decorators apply bottom up, so /v1/models is registered (and documented) first.
@router.get("/v1/model/list", dependencies=API)
@router.get("/v1/models", dependencies=API)
async def list_models(request: Request) -> dict[str, Any]:
    manager, config = manager_of(request), config_of(request)
    names = list(config.model.dummy_model_names) if config.model.use_dummy_models else []
    if auth_of(request).permission(request) == "admin":
        names += manager.folder_names()
    elif manager.ready_engine is not None:
        names.append(manager.ready_engine.model_name)
    return {"object": "list", "data": [model_card(name) for name in names]}


@router.get("/v1/model/draft/list", dependencies=API)
async def draft_list() -> dict[str, Any]:
    return {"object": "list", "data": []}


@router.get("/v1/model", dependencies=API)
async def current_model(request: Request) -> dict[str, Any]:
    engine = manager_of(request).require_engine()
    return model_card(engine.model_name, engine.card_parameters(), with_logging=True)


@router.get("/props", dependencies=API)
async def props(request: Request) -> dict[str, Any]:
    engine = manager_of(request).require_engine()
    template = engine.card_parameters().get("prompt_template_content") or ""
    return {"total_slots": 1, "chat_template": template, "default_generation_settings": {"n_ctx": engine.max_seq_len}}


@router.post("/v1/model/load", dependencies=ADMIN)
async def load_model(request: Request, body: ModelLoadRequest) -> EventSourceResponse:
    config = config_of(request)
    if (body.draft_model or {}).get("draft_model_name"):
        raise UnsupportedLoadOptionError("This server does not run draft models (speculative decoding); load without draft_model.")
    options = config.model.load_options(
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
        load_throttle_mbps=body.load_throttle_mbps,
    )
    events = manager_of(request).start_load(LoadRequest(body.model_name, options, body.backend))

    async def stream() -> AsyncIterator[str]:
        try:
            while (event := await events.get()) is not None:
                yield compact(event)
        except asyncio.CancelledError:
            # As TabbyAPI: the load is a task of its own and keeps the load lock until it ends, so a load
            # asked for meanwhile waits behind it (a client that gave up must watch for that end).
            log.warning("Model load request disconnected. The load will continue.")
            raise

    return EventSourceResponse(stream(), ping=config.network.sse_ping_interval)


@router.post("/v1/model/unload", dependencies=ADMIN)
async def unload_model(request: Request) -> None:
    await manager_of(request).unload()


@router.post("/v1/chat/completions", dependencies=API)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]

    def prompt_of(engine: Engine) -> str:
        return engine.render_chat(messages, bool(body.add_generation_prompt), body.template_vars)

    return await answer(request, body, "chat", prompt_of, "messages")


@router.post("/v1/completions", dependencies=API)
async def completions(request: Request, body: CompletionRequest) -> Any:
    prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
    return await answer(request, body, "text", lambda engine: prompt, "prompt")


@router.post("/v1/token/encode", dependencies=API)
async def token_encode(request: Request, body: TokenEncodeRequest) -> dict[str, Any]:
    engine = manager_of(request).require_engine()
    if isinstance(body.text, str):
        text = body.text
    else:
        text = engine.render_chat([{"role": m.role, "content": m.text()} for m in body.text], False)
    tokens = engine.encode(text, add_bos=body.add_bos_token, encode_special_tokens=body.encode_special_tokens)
    return {"tokens": tokens, "length": len(tokens)}


@router.post("/v1/token/decode", dependencies=API)
async def token_decode(request: Request, body: TokenDecodeRequest) -> dict[str, str]:
    engine = manager_of(request).require_engine()
    return {"text": engine.decode(body.tokens, decode_special_tokens=body.decode_special_tokens)}


# Completions: what chat and text completions share


async def answer(request: Request, body: SamplingRequest, kind: str, prompt_of: Callable[[Engine], str], param: str) -> Any:
    await inline_load(request, body.model)
    manager = manager_of(request)
    engine = manager.require_engine()
    try:
        prompt = prompt_of(engine)
    except (ChatTemplateError, ModelFolderError) as exc:
        raise PromptError(str(exc)) from None
    prompt_ids = engine.encode(prompt, add_bos=body.add_bos_token is not False)
    if len(prompt_ids) >= engine.max_seq_len:
        return context_error(ContextLengthError(len(prompt_ids), engine.max_seq_len), param)
    generation = Generation(kind, body, engine, prompt_ids)
    if body.stream:
        return EventSourceResponse(held_stream(manager, generation), ping=config_of(request).network.sse_ping_interval)
    async with manager.generation():
        return await until_disconnected(request, asyncio.create_task(generation.complete()))


async def inline_load(request: Request, model: str | None) -> None:
    """Load the model a completion names first, when the config allows it and the caller may."""
    manager, config, auth = manager_of(request), config_of(request), auth_of(request)
    if not (config.model.inline_model_loading and model) or model not in manager.folder_names():
        return
    if manager.engine is not None and manager.engine.model_name == model:
        return
    if auth.keys is not None and auth.permission(request) != "admin":
        raise HTTPException(401, f"Unable to switch model to {model} because an admin key isn't provided")
    last = await manager.load_and_wait(LoadRequest(model, config.model.load_options()))
    if "error" in last:
        raise ModelUnavailableError(f"Loading {model} failed: {last['error']['message']}")


async def held_stream(manager: ModelManager, generation: Generation) -> AsyncIterator[str]:
    # The body runs after the handler returned: the stream holds the model for its own lifetime
    # (and a stream that never starts holds nothing).
    try:
        async with manager.generation() as engine:
            if engine is not generation.engine:
                raise ModelUnavailableError("The model changed before the answer started.")
            async for item in generation.stream():
                yield item
    except TabbyError as exc:
        yield compact({"error": {"message": exc.detail, "trace": None}})


async def until_disconnected(request: Request, work: asyncio.Task[Any]) -> Any:
    """Await `work`, cancelling it if the client goes away first."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=0.25)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            raise HTTPException(499, "Client disconnected")
