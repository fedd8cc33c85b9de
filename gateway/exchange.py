"""One request of the OpenAI-compatible API on its way through chat's queue.

The request becomes a conversation of the key's user, marked as from the API, whose one question
carries the request as written (chat.prompts.asked). It is posted as any chat message: answered at once
when a backend holding the model is free, else held and released in its turn, within the same caps.
The exchange listens on the conversation's group (tokens, the end, the question's place in the queue)
and on the chat pages' group (a switch's progress), and turns those events into pieces: text, comments
on what the request waits for, and the end. When the request ends (answered, refused, or its caller
gone), the conversation is deleted: an answer still running stops within a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import ValidationError

from chat import prompts, services
from chat.balance import can_answer, default_model, likely_and_alone
from chat.early import EarlyRequest
from chat.generation import cancel_here
from chat.models import Conversation, Message
from chat.queue import schedule_positions, wake
from chat.streaming import Prompt
from gantry.background import spawn
from gantry.broadcast import CHAT_GROUP, Listening, conversation_group
from gantry.serving import in_web_thread, web_work
from gateway.keys import found_valid_within, user_of
from gateway.openai_input import ApiError, Asked, json_body
from models_admin.models import Backend, ModelSettings
from models_admin.services import chat_state
from models_admin.swap_scheduler import LoadRefused, check_request

T = TypeVar("T")
QUICK_FOR = 30.0  # seconds a key found valid, and a model's one backend and settings, are trusted by quick_start
QUICK_BODY = 65536  # bytes of a request body read on the event loop by quick_start (larger ones: in a thread)
COMMENT_EVERY = 5.0  # seconds: a held request hears where it stands at least this often
RETRY_AFTER = 30  # seconds, said to a request refused for waiting too long
WRONG_KEY = (
    "This API key is not valid: it was revoked, mistyped, or its account is deactivated. Make a new one on the API keys page."
)


@dataclass
class Text:
    text: str


@dataclass
class Comment:
    text: str


@dataclass
class Restart:
    """The answer was cut off (a model switch) and its request is queued again, for the new model."""


@dataclass
class Ended:
    finish_reason: str
    usage: dict[str, int] | None
    model: str


Piece = Text | Comment | Restart | Ended


def requested_model(user: Any, model: str | None) -> str:
    """The model a request is for ("": the default model, whichever it is, when it names none). A model
    served now is answered by a backend holding it. Another is waited for when a backend is loading it, or
    when its policy lets the caller have it loaded (the swap scheduler loads it). Else the default model's
    name, while no backend serves it (a switch, a server away), follows the default as chat's messages do;
    anything else is refused in OpenAI's shape: 404 for a model no model server has, 403 when the caller
    may not have it loaded."""
    if not model or can_answer(model):
        return model or ""
    try:
        check_request(model, bool(user.is_staff))
    except LoadRefused as exc:
        if model == default_model():
            return ""
        raise ApiError(exc.status, exc.message, code=exc.code, param="model") from None
    return model


@dataclass
class Begun:
    """A request read and its conversation written, its answer's request perhaps already sent (`early`)."""

    asked: Asked
    conversation: Conversation
    early: EarlyRequest


@dataclass
class Recent:
    """How a request for a model was last answered: by the one backend serving it then, with its settings."""

    backend: Backend
    values: dict[str, Any]
    at: float


@dataclass
class Sent:
    """A request whose answer's request went out from the event loop, on trust (`quick_start`)."""

    asked: Asked
    prompt: Prompt
    backend: Backend


# The model asked for ("": the default) -> how its last request was answered, while one backend served it.
_recent: dict[str, Recent] = {}


def quick_start(key: str, body: bytes, read: Callable[[dict[str, Any]], Asked], early: EarlyRequest) -> Sent | None:
    """On the event loop, with no database work: when this process found the key valid within
    QUICK_FOR seconds, and the model asked for was then served by one backend alone, the answer's
    request goes to that backend at once, with that model's settings as they were. A trust, not a
    permission: `begin` then checks the key, the model, the backend and the settings in the database,
    and withdraws the request (before anything of its answer is shown) or sends it again wherever
    anything differs. None when the request is not sent (it is then sent by `begin`)."""
    if len(body) > QUICK_BODY or not found_valid_within(key, QUICK_FOR):
        return None
    try:
        asked = read(json_body(body))
    except ApiError:
        return None  # refused by `begin`, in its order (the key first)
    recent = _recent.get(asked.model or "")
    if recent is None or time.monotonic() - recent.at > QUICK_FOR:
        return None
    prompt = prompts.asked(asked.request, recent.backend.active_model, values=recent.values)
    early.send(prompt, then=wake, backend=recent.backend, wait=False)
    return Sent(asked, prompt, recent.backend)


def begin(key: str, body: bytes, read: Callable[[dict[str, Any]], Asked], early: EarlyRequest, sent: Sent | None = None) -> Begun:
    """In one web thread, on the way of the first token: the key's user (401), the request read (400),
    the model it is for (404, 403); its answer's request sent to the backend most likely to answer it
    (the claim, once its question is saved, keeps it or sends it elsewhere), unless the one `sent`
    already went there with the same prompt; its conversation written. Whatever is refused withdraws
    the request sent."""
    try:
        user = user_of(key)
        if user is None:
            raise ApiError(401, WRONG_KEY, code="invalid_api_key")
        asked = sent.asked if sent is not None else read(json_body(body))
        picked = requested_model(user, asked.model)
        guess, alone = likely_and_alone(picked)
        if guess is None:
            early.withdraw()
            _recent.pop(asked.model or "", None)
        else:
            values = ModelSettings.objects.values_of(guess.active_model)
            prompt = prompts.asked(asked.request, guess.active_model, values=values)
            if sent is None or (sent.backend.pk, sent.backend.active_model) != (guess.pk, guess.active_model) or sent.prompt != prompt:
                early.send(prompt, then=wake, backend=guess)
            if alone:
                _recent[asked.model or ""] = Recent(guess, values, time.monotonic())
            else:
                _recent.pop(asked.model or "", None)
        conversation = Conversation.objects.create(
            owner=user, title="API request", source=Conversation.Source.API, model_name=picked
        )
    except BaseException:
        early.withdraw()
        raise
    return Begun(asked, conversation, early)


def _post(begun: Begun) -> tuple[Message, str]:
    """The request's question, and the model of the backend answering it ("" while it is held): known
    here, the first token need not look it up."""
    question = services.post_message(begun.conversation.pk, begun.asked.content, request=begun.asked.request, early=begun.early)
    return question, question.backend.active_model if question.backend is not None else ""


def discard(conversation_id: int) -> None:
    """The request ended: its answer stops (here at once; in another process at its next save) and its
    rows go; the requests held behind it move up."""
    generating = Message.objects.filter(conversation_id=conversation_id, role=Message.Role.USER, status=Message.Status.GENERATING)
    for message_id in generating.values_list("id", flat=True):
        cancel_here(message_id)
    held = Message.objects.filter(conversation_id=conversation_id, status=Message.Status.QUEUED).exists()
    Conversation.objects.filter(pk=conversation_id).delete()
    if held:
        schedule_positions()


def _question(message_id: int) -> tuple[str, str]:
    """The question's status, and the model of the backend answering it."""
    row = Message.objects.filter(pk=message_id).values_list("status", "backend__active_model").first()
    return (row[0], row[1] or "") if row is not None else (Message.Status.CANCELLED, "")


def waiting_text(progress: dict[str, Any] | None, state: dict[str, Any] | None, position: int | None) -> str:
    """`loading Large-Chat-1G 63%, 2 requests ahead`: what a held request waits for, and its place."""
    if progress is not None and progress.get("step") not in ("done", "failed"):
        model, percent, step = progress.get("model") or "the model", float(progress.get("percent") or 0), progress.get("step")
        what = f"loading {model} {percent:.0f}%" if step == "loading" else f"switching to {model} ({step}) {percent:.0f}%"
    elif state is not None and "unreachable" in (state.get("state"), state.get("trouble")):
        what = "waiting for the model server, which cannot be reached"
    elif state is not None and state.get("state") == "unloaded":
        what = "waiting for a model to be loaded"
    else:
        what = "waiting for the model"
    if position is None:
        return what
    ahead = position - 1
    return f"{what}, {'no' if not ahead else ahead} request{'' if ahead == 1 else 's'} ahead"


class Exchange:
    def __init__(self) -> None:
        self.asked = Asked(kind="chat", request={}, content="")
        self.layer = get_channel_layer()
        self.channel = ""
        self.groups: list[str] = []
        self.conversation_id: int | None = None
        self.early: EarlyRequest | None = None
        self.question_id = 0
        self.started = False
        self.held_since = time.monotonic()
        self.position: int | None = None
        self.progress: dict[str, Any] | None = None
        self.state: dict[str, Any] | None = None
        self.error = ""
        self.model = ""
        self.picked = ""  # the model it names, when it names one (not the default)
        self.listening: Listening | None = None
        self.step: Future[Any] | None = None  # the last work of `open` in a web thread

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        """`func` in a web thread. When the caller goes away meanwhile, it does not start, or runs to its
        end: `close` then discards what it wrote once it is done (a conversation, a question)."""
        self.step = web_work(func, *args)
        return await asyncio.wrap_future(self.step)

    async def open(self, key: str, body: bytes, read: Callable[[dict[str, Any]], Asked]) -> None:
        """Read the request and post it to the queue (listening first, so no event of it is missed); a
        full queue is 429, as chat refuses the message."""
        self.early = EarlyRequest()  # closed with the exchange, even while `begin` runs in its thread
        sent = quick_start(key, body, read, self.early)
        if sent is not None:
            await self.early.taken()
        begun = await self._in_thread(begin, key, body, read, self.early, sent)
        self.asked = begun.asked
        self.conversation_id, self.picked = begun.conversation.pk, begun.conversation.model_name
        self.channel = await self.layer.new_channel()
        self.listening = Listening(self.layer, self.channel)
        self.groups = [conversation_group(begun.conversation.pk), CHAT_GROUP]
        for group in self.groups:
            await self.layer.group_add(group, self.channel)
        try:
            question, self.model = await self._in_thread(_post, begun)
        except ValidationError as exc:
            self.close()
            raise ApiError(429, " ".join(exc.messages), kind="rate_limit_error", code="queue_full") from None
        self.question_id = question.pk
        self.started = question.status == Message.Status.GENERATING
        if not self.started:
            self.state = await in_web_thread(chat_state)  # what it waits for, until the next change says
        self.held_since = time.monotonic()

    def close(self) -> Future[None]:
        """Stop listening and discard the request (from anywhere, a cancelled task included: the work is
        spawned, never awaited here; the future it gives ends with it)."""
        if self.listening is not None:
            self.listening.close()
        if self.early is not None:
            self.early.close()  # a request sent before its question was saved, if it never was
        conversation_id, self.conversation_id = self.conversation_id, None
        return spawn(self._leave(list(self.groups), self.channel, conversation_id, self.step))

    async def _leave(self, groups: list[str], channel: str, conversation_id: int | None, step: Future[Any] | None) -> None:
        for group in groups:
            await self.layer.group_discard(group, channel)
        if step is not None:  # what a web thread still writes for a caller gone meanwhile goes too
            if not step.done():
                await asyncio.wait([asyncio.wrap_future(step)])
            begun = None if step.cancelled() or step.exception() is not None else step.result()
            if conversation_id is None and isinstance(begun, Begun):
                conversation_id = begun.conversation.pk
        if conversation_id is not None:
            await sync_to_async(discard)(conversation_id)

    async def _next_event(self, timeout: float) -> dict[str, Any] | None:
        assert self.listening is not None, "open() first"
        return await self.listening.next(timeout)

    def _check_hold(self) -> None:
        limit = settings.GANTRY_HOLD_TIMEOUT
        if not self.started and time.monotonic() - self.held_since > limit:
            message = f"The request waited {limit:g} seconds for the model without being answered. Send it again later."
            raise ApiError(503, message, kind="server_error", code="held_too_long", headers={"Retry-After": str(RETRY_AFTER)})

    async def pieces(self) -> AsyncIterator[Piece]:
        """The answer's pieces, and while it is held, comments saying what it waits for."""
        while True:
            left = settings.GANTRY_HOLD_TIMEOUT - (time.monotonic() - self.held_since)
            timeout = COMMENT_EVERY if self.started else max(0.05, min(COMMENT_EVERY, left + 0.05))
            event = await self._next_event(timeout)
            self._check_hold()
            if event is None:
                if not self.started:
                    yield Comment(self.waiting())
                continue
            async for piece in self._pieces_of(event):
                yield piece
                if isinstance(piece, Ended):
                    return

    def waiting(self) -> str:
        return waiting_text(self.progress, self.state, self.position)

    async def _pieces_of(self, event: dict[str, Any]) -> AsyncIterator[Piece]:
        kind = event.get("type")
        if kind == "model.progress" and self._waits_for(event.get("model")):
            self.progress = event
        elif kind == "model.state":
            self.state = event
            if event.get("state") == "ready":
                self.progress = None
        elif kind == "chat.queued" and event.get("message_id") == self.question_id:
            self.position = int(event["position"])
        elif kind == "chat.message" and event["message"]["id"] == self.question_id:
            self._question_changed(event["message"]["status"])
            return
        elif kind == "chat.error" and event.get("message_id") == self.question_id:
            self.error = str(event.get("detail") or "")
            return
        elif kind == "chat.token":
            self.started = True
            if not self.model:
                self.model = (await in_web_thread(_question, self.question_id))[1]
            yield Text(str(event["text"]))
            return
        elif kind == "chat.done":
            yield await self._ended(event)
            return
        else:
            return
        if not self.started and kind in ("model.progress", "chat.queued"):
            yield Comment(self.waiting())

    def _waits_for(self, model: Any) -> bool:
        """Whether a load's progress is that of the model the request waits for: the one it names, or for
        one following the default model, the default backend's switch (not another backend's load)."""
        if self.picked:
            return bool(model == self.picked)
        target = (self.state or {}).get("target_model")
        return not target or model == target

    def _question_changed(self, status: str) -> None:
        if status == Message.Status.GENERATING:
            self.started = True
        elif status == Message.Status.QUEUED and self.started:
            self.started, self.held_since = False, time.monotonic()  # cut off by a switch: held again

    async def _ended(self, event: dict[str, Any]) -> Piece:
        if event.get("status") == Message.Status.DONE:
            return Ended(str(event.get("finish_reason") or "stop"), event.get("usage"), str(event.get("model") or self.model))
        status, _ = await in_web_thread(_question, self.question_id)
        if status in (Message.Status.QUEUED, Message.Status.GENERATING):  # queued again (and maybe taken again)
            self.started, self.held_since, self.model = status == Message.Status.GENERATING, time.monotonic(), ""
            return Restart()
        if status == Message.Status.FAILED:
            raise failure(self.error)
        raise ApiError(500, "The answer was stopped before it was complete. Send the request again.", kind="server_error")


def failure(sentence: str) -> ApiError:
    if "context length" in sentence.lower() or "too long" in sentence.lower():
        return ApiError(400, sentence, code="context_length_exceeded", param="messages")
    return ApiError(502, sentence or "The model server could not answer. Send the request again.", kind="server_error")
