"""The TabbyAPI client: the one place Gantry speaks HTTP to the model server.

A plain library (no Django): the settings hand in a `TabbyConfig`. One client: the admin calls (list,
current model, unload, load with progress) block, as their callers run in worker threads and tasks; an
answer streams on an event loop (`open_chat`). What TabbyAPI sends is read by tabby_sse (event streams)
and tabby_errors (error answers), so the client only moves bytes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal, Self, TypedDict, TypeVar, cast

import httpx

from models_admin.tabby_errors import (
    NOTHING_LOADED,
    BackendAuthError,
    BackendBadResponse,
    BackendError,
    BackendUnavailable,
    NoModelLoaded,
    fastapi_detail,
    sentence,
    short_text,
)
from models_admin.tabby_sse import ChatDelta, ChatReader, LoadProgress, LoadReader, StreamReader

T = TypeVar("T")
U = TypeVar("U")
KeyKind = Literal["admin", "api"]


@dataclass(frozen=True)
class TabbyConfig:
    base_url: str
    api_key: str
    admin_key: str
    connect_timeout: float = 5.0
    # The longest silence allowed while waiting for an answer, or between two pieces of a stream.
    # TabbyAPI pings a load stream every 15 s by default, so a slow module does not trip it.
    read_timeout: float = 300.0
    # What to fix when TabbyAPI refuses a key: the end of the sentence (the caller knows its settings).
    admin_key_fix: str = "check that key in Gantry's settings"
    api_key_fix: str = "check that key in Gantry's settings"


class ModelCard(TypedDict, total=False):
    id: str
    object: str
    created: int
    owned_by: str
    logging: Any
    parameters: dict[str, Any] | None


# Requests


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    key: KeyKind
    action: str  # completes "TabbyAPI failed to ...", for the error sentences
    body: dict[str, Any] | None = None


LIST_MODELS = Call("GET", "/v1/models", "admin", "list the models")
CURRENT_MODEL = Call("GET", "/v1/model", "admin", "say which model is loaded")
SERVED_MODEL = Call("GET", "/v1/model", "api", "say which model is loaded")
UNLOAD = Call("POST", "/v1/model/unload", "admin", "unload the model")
PERMISSION = Call("GET", "/v1/auth/permission", "admin", "say what the admin key may do")
HEALTH = Call("GET", "/health", "api", "say whether it is healthy")  # needs no key


def load_call(model_name: str, params: Mapping[str, Any]) -> Call:
    action = f"load {model_name}" if model_name else "load a model"
    return Call("POST", "/v1/model/load", "admin", action, {**params, "model_name": model_name})


def chat_call(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Call:
    # No `model` field unless the caller asks: with one and nothing loaded, TabbyAPI answers a
    # plain-text 500 instead of its 503 (recordings 47, 48).
    body = {**params, "messages": [dict(m) for m in messages], "stream": True, "stream_options": {"include_usage": True}}
    return Call("POST", "/v1/chat/completions", "api", "start an answer", body)


def completion_call(prompt: str, params: Mapping[str, Any]) -> Call:
    """A plain completion of `prompt` (no chat template), streamed as an answer is."""
    body = {**params, "prompt": prompt, "stream": True, "stream_options": {"include_usage": True}}
    return Call("POST", "/v1/completions", "api", "start an answer", body)


KEEPALIVE_SECONDS = 4.0
REST_TIMEOUT = 0.2  # seconds an answer's stream waits for its response's end after `data: [DONE]` (it comes at once)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """Made once per process: building it (reading the CA bundle) takes tens of milliseconds, which
    every new client would otherwise pay before its first request (an answer's first token waits on it)."""
    return httpx.create_ssl_context()


def client_options(config: TabbyConfig) -> dict[str, Any]:
    return {
        "base_url": config.base_url.rstrip("/"),
        "timeout": httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
        "verify": tls_context(),
        # No cap on connections (the number of answers at once is Gantry's own setting); an idle one is
        # reused only within KEEPALIVE_SECONDS, under the 5 s after which TabbyAPI's server (uvicorn)
        # closes it.
        "limits": httpx.Limits(max_connections=None, max_keepalive_connections=32, keepalive_expiry=KEEPALIVE_SECONDS),
    }


def request_args(config: TabbyConfig, call: Call) -> dict[str, Any]:
    # The admin key goes as Bearer, the one header every TabbyAPI endpoint reads it from (admin endpoints
    # ignore x-api-key, API endpoints ignore x-admin-key). Generation uses the API key, as members would.
    key = config.admin_key if call.key == "admin" else config.api_key
    header = {"Authorization": f"Bearer {key}"} if call.key == "admin" else {"x-api-key": key}
    return {"method": call.method, "url": call.path, "headers": header if key else {}, "json": call.body}


# Errors from the transport and from answers


@contextmanager
def translated_errors(config: TabbyConfig, call: Call) -> Iterator[None]:
    """Turn httpx's transport exceptions into BackendUnavailable, so none leaks to callers."""
    where = f"TabbyAPI at {config.base_url}"
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise BackendUnavailable(f"{where} cannot be reached. Check that it is running and that the address is right.") from exc
    except httpx.TimeoutException as exc:
        raise BackendUnavailable(
            f"{where} stopped answering while trying to {call.action}: nothing came for {config.read_timeout:g} seconds."
        ) from exc
    except httpx.HTTPError as exc:
        raise BackendUnavailable(f"The connection to {where} broke while trying to {call.action}.") from exc


def answer_error(config: TabbyConfig, call: Call, response: httpx.Response) -> BackendError:
    """The error for an answer that is not what `call` expects (its body must have been read)."""
    status = response.status_code
    if response.is_success:
        return odd_answer(call, "an event stream", status)
    detail = fastapi_detail(response)
    said = detail or short_text(response)
    if status in (401, 403):
        kind, fix = ("admin", config.admin_key_fix) if call.key == "admin" else ("API", config.api_key_fix)
        return BackendAuthError(sentence(f"TabbyAPI refused Gantry's {kind} key ({said}); {fix}"), status, call.key)
    # Nothing loaded (or a load running) is a JSON 503; servers before 2025-04 sent it as a 400.
    if detail == NOTHING_LOADED or (status == 503 and detail is not None):
        return NoModelLoaded("No model is loaded in TabbyAPI right now (or one is still loading).", status)
    if status == 503:  # not FastAPI's JSON: a proxy in front of a TabbyAPI that is down
        return BackendUnavailable(sentence(f"TabbyAPI is unavailable ({said})"), status)
    if status in (404, 405):
        return BackendBadResponse(
            sentence(f"TabbyAPI has no {call.method} {call.path} ({said}); check that Gantry's address points at TabbyAPI"),
            status,
        )
    if status < 500:
        return BackendBadResponse(sentence(f"TabbyAPI refused to {call.action}: {said}"), status)
    return BackendBadResponse(sentence(f"TabbyAPI failed to {call.action} (HTTP {status}: {said})"), status)


# Answers


def json_answer(config: TabbyConfig, call: Call, response: httpx.Response) -> Any:
    if not response.is_success:
        raise answer_error(config, call, response)
    try:
        return json.loads(response.content)
    except ValueError:
        raise odd_answer(call, "JSON", response.status_code) from None


def odd_answer(call: Call, expected: str, status: int | None = None) -> BackendBadResponse:
    return BackendBadResponse(f"TabbyAPI's answer when asked to {call.action} is not {expected}.", status)


def card_from(call: Call, data: Any) -> ModelCard:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise odd_answer(call, "a model card")
    return cast(ModelCard, data)


def cards_from(call: Call, data: Any) -> list[ModelCard]:
    cards = data.get("data") if isinstance(data, dict) else None
    if not isinstance(cards, list):
        raise odd_answer(call, "a model list")
    return [card_from(call, card) for card in cards]


def is_event_stream(response: httpx.Response) -> bool:
    # Errors before a stream starts come as ordinary JSON (or plain-text) answers, never as events.
    return response.is_success and response.headers.get("content-type", "").startswith("text/event-stream")


# The client


class TabbyClient:
    """TabbyAPI over httpx. Admin calls block; `open_chat` streams an answer on the running event loop.

    Use as `with` (blocking calls) or close with `aclose()` (answers); each side's connections are made on
    first use. `transport` replaces the network in unit tests (httpx.MockTransport serves both sides).
    """

    def __init__(self, config: TabbyConfig, transport: httpx.MockTransport | None = None) -> None:
        self.config = config
        self._transport = transport
        self._http: httpx.Client | None = None
        self._async_http: httpx.AsyncClient | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()

    async def aclose(self) -> None:
        if self._async_http is not None:
            await self._async_http.aclose()

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(transport=self._transport, **client_options(self.config))
        return self._http

    @property
    def async_http(self) -> httpx.AsyncClient:
        if self._async_http is None:
            self._async_http = httpx.AsyncClient(transport=self._transport, **client_options(self.config))
        return self._async_http

    # Admin calls

    def list_models(self) -> list[ModelCard]:
        """Every model folder on the server (the admin key sees them all)."""
        return cards_from(LIST_MODELS, self._json(LIST_MODELS))

    def current_model(self, key: KeyKind = "admin") -> ModelCard | None:
        """The loaded model's card, None when nothing is loaded; asked with the admin key, or with the API
        key (`key="api"`: what answers, which use that key, will be served)."""
        call = CURRENT_MODEL if key == "admin" else SERVED_MODEL
        try:
            return card_from(call, self._json(call))
        except NoModelLoaded:
            return None

    def unload(self) -> None:
        self._json(UNLOAD)

    def admin_key_permission(self) -> str | None:
        """What TabbyAPI lets the admin key do: "admin", or "api" for a key that is only an API key; None
        for a server without `/v1/auth/permission` (older than the endpoint), which cannot say."""
        try:
            data = self._json(PERMISSION)
        except BackendBadResponse as exc:
            if exc.status in (404, 405):
                return None
            raise
        permission = data.get("permission") if isinstance(data, dict) else None
        if not isinstance(permission, str):
            raise odd_answer(PERMISSION, "a permission")
        return permission

    def health(self) -> None:
        """Returns when the server answers `GET /health` and calls itself healthy; else raises."""
        self._json(HEALTH)

    def load(self, model_name: str, **params: Any) -> Generator[LoadProgress, None, None]:
        """Progress events in order; ends after the main model's `finished`. Pings are not yielded."""
        call = load_call(model_name, params)
        reader = LoadReader(model_name)
        with translated_errors(self.config, call), self.http.stream(**request_args(self.config, call)) as response:
            if not is_event_stream(response):
                response.read()
                raise answer_error(self.config, call, response)
            for chunk in response.iter_bytes():
                yield from reader.feed(chunk)
                if reader.done:
                    break
            yield from reader.end()

    def _json(self, call: Call) -> Any:
        with translated_errors(self.config, call):
            response = self.http.request(**request_args(self.config, call))
        return json_answer(self.config, call, response)

    # Answers

    def open_chat(
        self, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> AbstractAsyncContextManager[AsyncGenerator[ChatDelta, None]]:
        """An answer's stream: entered once TabbyAPI has taken the request (the answer's headers came), it
        gives the pieces; leaving it closes the response, which makes TabbyAPI stop the generation."""
        return self._opened(chat_call(messages, params), ChatReader(), _items)

    def open_chat_batches(
        self, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> AbstractAsyncContextManager[AsyncGenerator[list[ChatDelta], None]]:
        """As `open_chat`, but the pieces that came in one read of the connection come as one list: a
        reader that fell behind TabbyAPI (a busy process) catches up in one step, not one step a piece."""
        return self._opened(chat_call(messages, params), ChatReader(), _batches)

    def open_completion_batches(self, prompt: str, **params: Any) -> AbstractAsyncContextManager[AsyncGenerator[list[ChatDelta], None]]:
        """As `open_chat_batches`, for a plain completion of `prompt`."""
        return self._opened(completion_call(prompt, params), ChatReader(), _batches)

    @asynccontextmanager
    async def _opened(
        self, call: Call, reader: StreamReader[T], items: Callable[[httpx.Response, StreamReader[T]], AsyncGenerator[U, None]]
    ) -> AsyncIterator[AsyncGenerator[U, None]]:
        # The caller's reading happens inside this block, so a transport error while reading is translated too.
        with translated_errors(self.config, call):
            async with self.async_http.stream(**request_args(self.config, call)) as response:
                if not is_event_stream(response):
                    await response.aread()
                    raise answer_error(self.config, call, response)
                async with aclosing(items(response, reader)) as read:
                    yield read


async def _items(response: httpx.Response, reader: StreamReader[T]) -> AsyncGenerator[T, None]:
    async for batch in _batches(response, reader):
        for item in batch:
            yield item


async def _batches(response: httpx.Response, reader: StreamReader[T]) -> AsyncGenerator[list[T], None]:
    """The items of each read of the response, as one list (never empty)."""
    chunks = response.aiter_bytes()
    async for chunk in chunks:
        batch, error = _taken(reader.feed(chunk))
        if batch:
            yield batch
        if error is not None:
            raise error
        if reader.done:
            break
    batch, error = _taken(reader.end())
    if batch:
        yield batch
    if error is not None:
        raise error
    if reader.done:
        await _rest(chunks)


async def _rest(chunks: AsyncIterator[bytes]) -> None:
    """The response's end after `data: [DONE]` (the server sends it at once). Read to its end, the
    connection goes back to the pool for the next answer; left unread, closing the response closes the
    connection, and the next answer's request would wait for a new one. A server that keeps the response
    open after `[DONE]` only has it closed, as before."""
    with suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(REST_TIMEOUT):
            async for _ in chunks:
                pass


def _taken(items: Iterator[T]) -> tuple[list[T], BackendError | None]:
    """The items up to an error event, and that error: the items before it are handed over first."""
    taken: list[T] = []
    try:
        taken.extend(items)  # what came before the error stays in the list
    except BackendError as exc:
        return taken, exc
    return taken, None
