"""TabbyAPI's event streams: Server-Sent Events cut into payloads, and the readers that turn a load's or an
answer's payloads into items and know when the stream is complete (see `contracts/tabbyapi.md`)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar, cast

from models_admin.tabby_errors import BackendBadResponse, BackendError, GenerationFailed, ModelLoadFailed, sentence

T = TypeVar("T")


# JSON shapes


class LoadProgress(TypedDict):
    """One progress event of `POST /v1/model/load`: module `module` of `modules` of one component."""

    model_type: str  # "vision", "draft" or "model"
    module: int
    modules: int
    status: str  # "processing" or "finished"


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


# Reading streams


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
    if "text" in choice and "delta" not in choice:  # a completion's piece (`POST /v1/completions`)
        text = choice.get("text") or ""
    finish, usage = choice.get("finish_reason"), event.get("usage")
    if not isinstance(text, str) or not isinstance(finish, str | None) or not isinstance(usage, dict | None):
        raise unreadable("completion", payload)
    return ChatDelta(text=text, finish_reason=finish, usage=cast(Usage | None, usage), model=str(event.get("model") or ""))
