"""An answer's stream from TabbyAPI: opening it (a conversation too long for the model drops its oldest
turns and asks again) and relaying its pieces to the conversation's pages, saved as they grow."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from chat.growing import track, untrack
from chat.models import Message
from chat.usage import Spent
from gantry.broadcast import TokenEvent, abroadcast, conversation_group
from gantry.metrics import FIRST_TOKEN_SECONDS, TOKENS_PER_SECOND
from models_admin.clients import answer_client
from models_admin.models import Backend
from models_admin.tabby_errors import BackendBadResponse, BackendError, BackendUnavailable, GenerationFailed, NoModelLoaded
from models_admin.tabby_sse import ChatDelta


class Stopped(Exception):
    """The question was stopped from another process."""


class Pace:
    """An answer's first token and decoding speed, observed once each per answer (never per token).

    The clock starts as the answer's request goes to TabbyAPI (the time a held message waited before is
    gantry_hold_seconds); the speed counts the tokens after the first (TabbyAPI's count when it sends
    one, else the pieces) over the time from the first piece to the last, for answers that ended by
    themselves.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first = self.last = 0.0
        self.pieces = 0
        self.tokens = 0
        self.finish_reason: str | None = None  # as TabbyAPI said it ("stop", "length")
        self.usage: dict[str, int] | None = None  # TabbyAPI's token counts, from its last piece

    def piece(self, model: str) -> None:
        self.last = time.monotonic()
        if not self.pieces:
            self.first = self.last
            FIRST_TOKEN_SECONDS.labels(model or "unknown").observe(self.first - self.started)
        self.pieces += 1

    def began(self) -> datetime:
        """When the answer's request was sent, by the wall clock."""
        return timezone.now() - timedelta(seconds=time.monotonic() - self.started)

    def spent(self, held: float) -> Spent:
        """What an answer that ended by itself cost: the model server's token counts (without them, the
        pieces streamed), `held` seconds before its request, and the time from its request to now."""
        usage = self.usage or {}
        return Spent(
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", self.pieces),
            hold_seconds=held,
            generation_seconds=time.monotonic() - self.started,
        )

    def ended(self, model: str) -> None:
        tokens = self.tokens or self.pieces
        if tokens > 1 and self.last > self.first:
            TOKENS_PER_SECOND.labels(model or "unknown").observe((tokens - 1) / (self.last - self.first))


@dataclass(frozen=True)
class Prompt:
    """What an answer's request sends: the conversation (its answered turns, oldest first, then the
    question), after the answering model's system prompt, with its generation settings.

    A request of the OpenAI-compatible API is sent as its caller wrote it (`fixed`: never shortened),
    and a plain completion (`text`, not None) goes to TabbyAPI's `/v1/completions` instead."""

    turns: list[dict[str, str]]
    system: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    fixed: bool = False

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def shortened(self) -> Prompt:
        """Without the oldest turn (question and answer); the system prompt stays first."""
        return replace(self, turns=self.turns[2:] if len(self.turns) > 2 else self.turns[-1:])


def too_long(exc: BackendError) -> bool:
    return isinstance(exc, BackendBadResponse) and exc.status == 400 and "context length" in exc.message.lower()


def failure_sentence(exc: BackendError, kept: bool = True) -> str:
    """The sentence for a failed answer; `kept`: a chat message, which Retry sends again (not so an API
    request, whose caller sends it again)."""
    reason = exc.message.rstrip(". ")
    if not kept:
        return f"The model server could not answer ({reason})."
    if isinstance(exc, BackendUnavailable):
        return "The model server cannot be reached right now. Your message is kept: press Retry to send it again."
    if isinstance(exc, NoModelLoaded):
        return "No model is loaded right now. Your message is kept: press Retry once a model is loaded."
    if too_long(exc):
        return f"This message is too long for the model ({reason}). Shorten it and send it as a new message."
    if isinstance(exc, GenerationFailed):
        return f"The model stopped with an error ({reason}). Your message is kept: press Retry to send it again."
    return f"The model server answered with an error ({reason}). Your message is kept: press Retry to send it again."


@asynccontextmanager
async def opened(
    prompt: Prompt, backend: Backend, taken: threading.Event | None = None
) -> AsyncIterator[AsyncGenerator[list[ChatDelta], None]]:
    """The answer's stream from the backend, once its TabbyAPI has taken the request (`taken` is set then, or when it refused);
    leaving closes the response, which ends the generation upstream (Stop, cancellation)."""
    params = {"max_tokens": settings.GANTRY_MAX_ANSWER_TOKENS, **prompt.params}
    async with AsyncExitStack() as stack:
        try:
            while True:
                try:
                    client = answer_client(backend)
                    if prompt.text is not None:
                        opening = client.open_completion_batches(prompt.text, **params)
                    else:
                        opening = client.open_chat_batches(prompt.messages(), **params)
                    stream = await stack.enter_async_context(opening)
                    break
                except BackendBadResponse as exc:
                    if not (too_long(exc) and len(prompt.turns) > 1) or prompt.fixed:
                        raise
                    prompt = prompt.shortened()
        finally:
            if taken is not None:
                taken.set()
        yield stream


async def relay(
    stream: AsyncGenerator[list[ChatDelta], None],
    reply: Message,
    pieces: list[str],
    announced: Callable[[], Awaitable[None]],
    pace: Pace,
) -> str:
    """The answer's pieces to its pages as they come (after `announced()`), saved now and then (by
    chat.growing, never here); returns the model's name. Raises Stopped when the question was stopped
    elsewhere.

    The pieces of one read of TabbyAPI's stream go out as one event: when this process falls behind
    (a crowd of answers), a page gets what came meanwhile in one frame, not one frame a piece."""
    group = conversation_group(reply.conversation_id)
    growing = track(reply, pieces)
    model = ""
    try:
        async for deltas in stream:
            text = ""
            for delta in deltas:
                model = delta.model or model
                if delta.usage:
                    pace.tokens = int(delta.usage.get("completion_tokens") or 0)
                    pace.usage = {key: int(value) for key, value in delta.usage.items() if isinstance(value, int)}
                pace.finish_reason = delta.finish_reason or pace.finish_reason
                # A byte-level vocabulary has a NUL token, and PostgreSQL text cannot hold NUL: the save would fail.
                piece = delta.text.replace("\x00", "")
                if piece:
                    pace.piece(model)
                    text += piece
            if text:
                pieces.append(text)
                await announced()  # the answer's message before its first token
                await abroadcast(group, TokenEvent(type="chat.token", message_id=reply.pk, text=text))
            if growing.stopped:
                raise Stopped
    finally:
        untrack(growing)
    pace.ended(model)
    return model
