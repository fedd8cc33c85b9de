"""The TabbyAPI client: the one place Gantry speaks HTTP to the model server.

A plain library (no Django): the settings hand in a `TabbyConfig`. There are two clients, async (chat
streaming in the web process) and sync (tasks, management commands). What TabbyAPI sends (SSE framing,
progress and completion events, error answers; see `contracts/tabbyapi.md`) is read by the plain
functions and readers below, so the two classes only move bytes.
"""

from __future__ import annotations

import functools
import json
import ssl
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Literal, Self, TypedDict, TypeVar, cast

import httpx

T = TypeVar("T")
KeyKind = Literal["admin", "api"]

# TabbyAPI's answer to generation, `GET /v1/model` and unload while nothing is loaded (or a load runs).
NOTHING_LOADED = "No models are currently loaded."


# Errors


class BackendError(Exception):
    """A failure talking to TabbyAPI.

    `message` says what happened in a sentence for people; `status` is the HTTP status of TabbyAPI's error
    answer, None when there was none (unreachable, or an error reported inside a 200 stream).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class BackendUnavailable(BackendError):
    """TabbyAPI cannot be reached, stopped answering, or the connection broke."""


class BackendAuthError(BackendError):
    """TabbyAPI refused the key (401/403)."""


class NoModelLoaded(BackendError):
    """Nothing is loaded, which is also how TabbyAPI looks while a load runs."""


class ModelLoadFailed(BackendError):
    """A load stream reported an error, or closed before the model's final `finished` event."""


class BackendBadResponse(BackendError):
    """TabbyAPI refused the request or answered something Gantry cannot use."""


class GenerationFailed(BackendError):
    """A completion stream reported an error, or closed before the answer was complete."""


# JSON shapes


class LoadProgress(TypedDict):
    """One progress event of `POST /v1/model/load`: module `module` of `modules` of one component."""

    model_type: str  # "vision", "draft" or "model"
    module: int
    modules: int
    status: str  # "processing" or "finished"


class ModelCard(TypedDict, total=False):
    id: str
    object: str
    created: int
    owned_by: str
    logging: Any
    parameters: dict[str, Any] | None


class Usage(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class ChatDelta:
    """One streamed piece of an answer; the last piece carries `finish_reason` and `usage`."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str = ""


@dataclass(frozen=True)
class TabbyConfig:
    base_url: str
    api_key: str
    admin_key: str
    connect_timeout: float = 5.0
    # The longest silence allowed while waiting for an answer, or between two pieces of a stream.
    # TabbyAPI pings a load stream every 15 s by default, so a slow module does not trip it.
    read_timeout: float = 300.0


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
UNLOAD = Call("POST", "/v1/model/unload", "admin", "unload the model")


def load_call(model_name: str, params: Mapping[str, Any]) -> Call:
    action = f"load {model_name}" if model_name else "load a model"
    return Call("POST", "/v1/model/load", "admin", action, {**params, "model_name": model_name})


def chat_call(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Call:
    # No `model` field unless the caller asks: with one and nothing loaded, TabbyAPI answers a
    # plain-text 500 instead of its 503 (recordings 47, 48).
    body = {**params, "messages": [dict(m) for m in messages], "stream": True, "stream_options": {"include_usage": True}}
    return Call("POST", "/v1/chat/completions", "api", "start an answer", body)


KEEPALIVE_SECONDS = 4.0


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


def answer_error(call: Call, response: httpx.Response) -> BackendError:
    """The error for an answer that is not what `call` expects (its body must have been read)."""
    status = response.status_code
    if response.is_success:
        return odd_answer(call, "an event stream", status)
    detail = fastapi_detail(response)
    said = detail or short_text(response)
    if status in (401, 403):
        kind = "admin" if call.key == "admin" else "API"
        return BackendAuthError(
            sentence(f"TabbyAPI refused Gantry's {kind} key ({said}); check that key in Gantry's settings"), status
        )
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


def fastapi_detail(response: httpx.Response) -> str | None:
    """FastAPI's `{"detail": ...}` as one sentence; None when the body is not that (e.g. a plain-text 500)."""
    try:
        data = json.loads(response.content)
    except ValueError:
        return None
    if not isinstance(data, dict) or "detail" not in data:
        return None
    detail = data["detail"]
    if isinstance(detail, list):  # a 422: one item per field that failed validation
        return "; ".join(validation_item(item) for item in detail) or None
    return str(detail).strip() or None


def validation_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    text = str(item.get("msg") or "Invalid value")
    field = field_name(item.get("loc"))
    ctx = item.get("ctx")
    reason = ctx.get("error") if isinstance(ctx, dict) else None
    return text + (f" for {field}" if field else "") + (f" ({reason})" if reason else "")


def field_name(loc: Any) -> str:
    """`["body", "messages", 0, "content"]` -> `messages[0].content`; `["body", 15]` -> a JSON position."""
    if not isinstance(loc, list) or len(loc) < 2:
        return ""
    rest = loc[1:]  # loc[0] says where in the request: body, query, header
    if len(rest) == 1 and isinstance(rest[0], int):
        return f"the {loc[0]} at character {rest[0]}"
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest).lstrip(".")


def short_text(response: httpx.Response) -> str:
    lines = response.content.decode("utf-8", errors="replace").strip().splitlines()
    return lines[0][:200] if lines else response.reason_phrase


def sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."


# Answers


def json_answer(call: Call, response: httpx.Response) -> Any:
    if not response.is_success:
        raise answer_error(call, response)
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


# Server-Sent Events


class SseDecoder:
    """Cuts a byte stream into the data payloads of its events, wherever the chunks happen to split it.

    TabbyAPI ends lines in CRLF; a chunk may end between the CR and the LF, or mid-line, or mid-character
    (splitting on the LF byte never cuts a UTF-8 character). Comment lines (`: ping - <time>`, sent while a
    load waits) carry no payload, so they are never mistaken for progress.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return self._payloads(lines)

    def end(self) -> list[str]:
        # A last event without its blank line still counts: better read an error than lose it.
        lines, self._pending = [self._pending, b""], b""
        return self._payloads(lines)

    def _payloads(self, lines: list[bytes]) -> list[str]:
        payloads = []
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", errors="replace")
            if not line and self._data:
                payloads.append("\n".join(self._data))
                self._data = []
            elif line.startswith("data:"):
                self._data.append(line.removeprefix("data:").removeprefix(" "))
        return payloads


class StreamReader(ABC, Generic[T]):
    """Turns one kind of event stream into items, and knows when the stream is complete."""

    def __init__(self) -> None:
        self._decoder = SseDecoder()
        self.done = False

    def feed(self, chunk: bytes) -> Iterator[T]:
        return self._items(self._decoder.feed(chunk))

    def end(self) -> Iterator[T]:
        yield from self._items(self._decoder.end())
        if not self.complete():
            raise self.incomplete()

    def complete(self) -> bool:
        return self.done

    def _items(self, payloads: list[str]) -> Iterator[T]:
        # Lazy on purpose: an error event raises only after the items before it were handed over.
        for payload in payloads:
            if self.done:
                return  # nothing after the final event counts
            item = self.read(payload)
            if item is not None:
                yield item

    @abstractmethod
    def read(self, payload: str) -> T | None: ...

    @abstractmethod
    def incomplete(self) -> BackendError: ...


def event_object(payload: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise unreadable("stream", payload)
    return event


def unreadable(kind: str, payload: str) -> BackendBadResponse:
    return BackendBadResponse(f"TabbyAPI sent a {kind} event Gantry cannot read: {payload[:200]!r}.")


def error_message(event: dict[str, Any]) -> str | None:
    """The message of an `{"error": {"message": ...}}` event; None for any other event."""
    if "error" not in event:
        return None
    error = event["error"]
    message = error.get("message") if isinstance(error, dict) else error
    return str(message or "").strip() or "TabbyAPI reported an error without saying what it was."


class LoadReader(StreamReader[LoadProgress]):
    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name

    def read(self, payload: str) -> LoadProgress:
        event = event_object(payload)
        message = error_message(event)
        if message is not None:
            raise ModelLoadFailed(sentence(f"TabbyAPI could not load {self.model_name}: {message}"))
        progress = progress_from(event, payload)
        # A draft or vision component ends with its own `finished`; only the main model's ends the load.
        self.done = progress["model_type"] == "model" and progress["status"] == "finished"
        return progress

    def incomplete(self) -> BackendError:
        return ModelLoadFailed(
            f"Loading {self.model_name} stopped before it finished: TabbyAPI closed the progress stream early."
        )


def progress_from(event: dict[str, Any], payload: str) -> LoadProgress:
    model_type, module, modules, status = (event.get(key) for key in ("model_type", "module", "modules", "status"))
    if not (isinstance(model_type, str) and isinstance(module, int) and isinstance(modules, int) and isinstance(status, str)):
        raise unreadable("load progress", payload)
    return LoadProgress(model_type=model_type, module=module, modules=modules, status=status)


class ChatReader(StreamReader[ChatDelta]):
    def __init__(self) -> None:
        super().__init__()
        self.finished = False

    def read(self, payload: str) -> ChatDelta | None:
        if payload.strip() == "[DONE]":
            self.done = True
            return None
        event = event_object(payload)
        message = error_message(event)
        if message is not None:  # mid-stream errors come inside the 200 stream, with no [DONE]
            raise GenerationFailed(message)
        delta = delta_from(event, payload)
        self.finished = self.finished or delta.finish_reason is not None
        return delta if (delta.text or delta.finish_reason or delta.usage) else None

    def complete(self) -> bool:
        # A stream cut after the piece with the finish reason but before [DONE] still delivered the answer.
        return self.done or self.finished

    def incomplete(self) -> BackendError:
        return GenerationFailed("TabbyAPI closed the stream before the answer was complete.")


def delta_from(event: dict[str, Any], payload: str) -> ChatDelta:
    choices = event.get("choices") or [{}]  # a usage-only chunk (OpenAI's way) has no choices
    choice = choices[0] if isinstance(choices, list) else None
    if not isinstance(choice, dict):
        raise unreadable("completion", payload)
    delta = choice.get("delta") or {}
    text = (delta.get("content") or "") if isinstance(delta, dict) else None
    finish, usage = choice.get("finish_reason"), event.get("usage")
    if not isinstance(text, str) or not isinstance(finish, str | None) or not isinstance(usage, dict | None):
        raise unreadable("completion", payload)
    return ChatDelta(text=text, finish_reason=finish, usage=cast(Usage | None, usage), model=str(event.get("model") or ""))


# The clients


class AsyncTabbyClient:
    """TabbyAPI over async httpx. Use as `async with`; wrap a stream in `contextlib.aclosing` to stop it
    early: closing the stream closes the HTTP response, which makes TabbyAPI cancel the generation."""

    def __init__(self, config: TabbyConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._http = httpx.AsyncClient(transport=transport, **client_options(config))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def list_models(self) -> list[ModelCard]:
        """Every model folder on the server (the admin key sees them all)."""
        return cards_from(LIST_MODELS, await self._json(LIST_MODELS))

    async def current_model(self) -> ModelCard | None:
        try:
            return card_from(CURRENT_MODEL, await self._json(CURRENT_MODEL))
        except NoModelLoaded:
            return None

    async def unload(self) -> None:
        await self._json(UNLOAD)

    def load(self, model_name: str, **params: Any) -> AsyncGenerator[LoadProgress, None]:
        """Progress events in order; ends after the main model's `finished`. Pings are not yielded."""
        return self._events(load_call(model_name, params), LoadReader(model_name))

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> AsyncGenerator[ChatDelta, None]:
        return self._events(chat_call(messages, params), ChatReader())

    def open_chat(
        self, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> AbstractAsyncContextManager[AsyncGenerator[ChatDelta, None]]:
        """`stream_chat` in two steps: entered once TabbyAPI has taken the request (the answer's headers
        came), it gives the pieces; leaving it closes the response, which stops the generation."""
        return self._opened(chat_call(messages, params), ChatReader())

    async def _json(self, call: Call) -> Any:
        with translated_errors(self.config, call):
            response = await self._http.request(**request_args(self.config, call))
        return json_answer(call, response)

    async def _events(self, call: Call, reader: StreamReader[T]) -> AsyncGenerator[T, None]:
        async with self._opened(call, reader) as items:
            async for item in items:
                yield item

    @asynccontextmanager
    async def _opened(self, call: Call, reader: StreamReader[T]) -> AsyncIterator[AsyncGenerator[T, None]]:
        # The caller's reading happens inside this block, so a transport error while reading is translated too.
        with translated_errors(self.config, call):
            async with self._http.stream(**request_args(self.config, call)) as response:
                if not is_event_stream(response):
                    await response.aread()
                    raise answer_error(call, response)
                async with aclosing(_items(response, reader)) as items:
                    yield items


async def _items(response: httpx.Response, reader: StreamReader[T]) -> AsyncGenerator[T, None]:
    async for chunk in response.aiter_bytes():
        for item in reader.feed(chunk):
            yield item
        if reader.done:
            break
    for item in reader.end():
        yield item


class TabbyClient:
    """TabbyAPI over sync httpx, with the same methods as AsyncTabbyClient. Use as `with`."""

    def __init__(self, config: TabbyConfig, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        self._http = httpx.Client(transport=transport, **client_options(config))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def list_models(self) -> list[ModelCard]:
        return cards_from(LIST_MODELS, self._json(LIST_MODELS))

    def current_model(self) -> ModelCard | None:
        try:
            return card_from(CURRENT_MODEL, self._json(CURRENT_MODEL))
        except NoModelLoaded:
            return None

    def unload(self) -> None:
        self._json(UNLOAD)

    def load(self, model_name: str, **params: Any) -> Generator[LoadProgress, None, None]:
        return self._events(load_call(model_name, params), LoadReader(model_name))

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Generator[ChatDelta, None, None]:
        return self._events(chat_call(messages, params), ChatReader())

    def _json(self, call: Call) -> Any:
        with translated_errors(self.config, call):
            response = self._http.request(**request_args(self.config, call))
        return json_answer(call, response)

    def _events(self, call: Call, reader: StreamReader[T]) -> Generator[T, None, None]:
        with translated_errors(self.config, call), self._http.stream(**request_args(self.config, call)) as response:
            if not is_event_stream(response):
                response.read()
                raise answer_error(call, response)
            for chunk in response.iter_bytes():
                yield from reader.feed(chunk)
                if reader.done:
                    break
            yield from reader.end()
