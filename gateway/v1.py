"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`,
with a personal key (`Authorization: Bearer <key>`). Async views: a request waiting for the model or
streaming its answer holds no thread; a caller who goes away cancels the view, which discards its request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from gantry.serving import in_web_thread
from gateway.exchange import WRONG_KEY, Comment, Ended, Exchange, Restart, Text
from gateway.keys import user_of
from gateway.openai_input import ApiError, Asked, chat_request, completion_request
from models_admin.services import served_models
from models_admin.swap_scheduler import loadable_models

NO_KEY = (
    "No API key was sent. Send your personal key in the header `Authorization: Bearer <key>` "
    "(make one on the API keys page of your profile)."
)
CUT_OFF = "The answer was cut off by a model switch after it had begun. Send the request again."


def error_response(exc: ApiError) -> JsonResponse:
    response = JsonResponse(exc.body(), status=exc.status)
    for name, value in exc.headers.items():
        response[name] = value
    return response


def bearer(request: HttpRequest) -> Any:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise ApiError(401, NO_KEY, code="invalid_api_key")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, NO_KEY, code="invalid_api_key")
    return key.strip()


def openai_view(methods: tuple[str, ...], keyed: bool = False) -> Callable[[Any], Any]:
    """The key checked (401 in OpenAI's shape), the method checked (405), every refusal in OpenAI's shape.
    `keyed`: the view is given the key and looks its user up itself (with the rest of its first database
    work, in one hop to a web thread), else the user."""

    def wrap(view: Any) -> Any:
        @wraps(view)
        async def checked(request: HttpRequest) -> HttpResponseBase:
            try:
                if request.method not in methods:
                    raise ApiError(405, f"Use {' or '.join(methods)} for {request.path}.", code="method_not_allowed")
                key = bearer(request)
                user = key if keyed else await in_web_thread(user_of, key)
                if user is None:
                    raise ApiError(401, WRONG_KEY, code="invalid_api_key")
                response: HttpResponseBase = await view(request, user)
                return response
            except ApiError as exc:
                return error_response(exc)

        return csrf_exempt(checked)

    return wrap


def _listed(is_admin: bool) -> list[str]:
    """The models served now (the default first), or the default model alone while none is (a switch);
    then those the caller may have loaded by naming them (their policies' `load_on_request`)."""
    picker = served_models()
    listed = picker["served"] or ([picker["default"]] if picker["default"] else [])
    return listed + [model for model in loadable_models(is_admin) if model not in listed]


@openai_view(("GET",))
async def models(request: HttpRequest, user: Any) -> HttpResponseBase:
    """The models a request may name: those served now, the default first (during a switch, the one
    being loaded), then those a request of this caller would have loaded."""
    now = int(time.time())
    listed = await in_web_thread(_listed, bool(user.is_staff))
    data = [{"id": model, "object": "model", "created": now, "owned_by": "gantry"} for model in listed]
    return JsonResponse({"object": "list", "data": data})


@openai_view(("POST",), keyed=True)
async def chat_completions(request: HttpRequest, key: str) -> HttpResponseBase:
    return await answer(key, request.body, chat_request)


@openai_view(("POST",), keyed=True)
async def completions(request: HttpRequest, key: str) -> HttpResponseBase:
    return await answer(key, request.body, completion_request)


class Shape:
    """OpenAI's bodies for one answer: a chat completion or a text completion, whole or in chunks."""

    def __init__(self, asked: Asked, exchange: Exchange) -> None:
        self.asked, self.chat = asked, asked.kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-gantry-{exchange.conversation_id}"
        self.created = int(time.time())
        self.model = asked.model or ""

    def envelope(self, choices: list[dict[str, Any]], streaming: bool, model: str) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": model or self.model, "choices": choices}

    def chunk(self, text: str | None, finish: str | None, model: str, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self.envelope([choice], True, model)

    def whole(self, text: str, ended: Ended) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(finish_reason=ended.finish_reason, logprobs=None)
        return {**self.envelope([choice], False, ended.model), "usage": ended.usage}


def sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def answer(key: str, body: bytes, read: Callable[[dict[str, Any]], Asked]) -> HttpResponseBase:
    exchange = Exchange()
    try:
        await exchange.open(key, body, read)  # 401, 400, 404, 403 or 429 before any answer starts
    except asyncio.CancelledError:
        exchange.close()  # the caller went away while the request was being queued
        raise
    asked = exchange.asked
    shape = Shape(asked, exchange)
    if asked.stream:
        response = StreamingHttpResponse(streamed(exchange, shape), content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # a proxy passes each piece on at once
        return response
    try:
        return await whole(exchange, shape)
    finally:
        exchange.close()  # also when the caller went away (the view is cancelled)


async def whole(exchange: Exchange, shape: Shape) -> HttpResponse:
    parts: list[str] = []
    try:
        async for piece in exchange.pieces():
            if isinstance(piece, Text):
                parts.append(piece.text)
            elif isinstance(piece, Restart):
                parts.clear()
            elif isinstance(piece, Ended):
                return JsonResponse(shape.whole("".join(parts), piece))
    except ApiError as exc:
        return error_response(exc)
    raise AssertionError("an answer's pieces end with its end")


async def streamed(exchange: Exchange, shape: Shape) -> AsyncIterator[bytes]:
    """The answer as Server-Sent Events: while it is held, comments (`: loading X 63%, 2 requests
    ahead`); then its chunks, the last with its finish reason, its usage if asked, and `data: [DONE]`.
    A refusal after the stream began is an error event, as OpenAI sends one."""
    sent = False
    yield b""  # the status and headers go out now: the caller knows its request was taken
    try:
        async for piece in exchange.pieces():
            if isinstance(piece, Comment):
                yield f": {piece.text}\n\n".encode()
            elif isinstance(piece, Text):
                yield sse(shape.chunk(piece.text, None, exchange.model, first=not sent))
                sent = True
            elif isinstance(piece, Restart) and sent:
                raise ApiError(502, CUT_OFF, kind="server_error", code="interrupted")
            elif isinstance(piece, Ended):
                yield sse(shape.chunk(None, piece.finish_reason, piece.model, first=not sent))
                if shape.asked.include_usage:
                    yield sse({**shape.envelope([], True, piece.model), "usage": piece.usage})
                yield b"data: [DONE]\n\n"
                return
    except ApiError as exc:
        yield sse(exc.body())
    finally:
        exchange.close()  # also when the caller went away (the stream is cancelled)
