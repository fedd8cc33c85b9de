"""Every server-to-browser message: one TypedDict per event type, sent through the channel layer.

Groups: `conversation-<id>` (the pages of one conversation), `user-<id>` (every chat page of a user),
`sockets-<id>` (every socket of a user, chat and Admin Dashboard: told when a session ends), `chat`
(every chat page: the model banner), `models` (every Admin Dashboard page).
The browser switches on `type`; Channels turns the dotted type into a consumer method name.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, NotRequired, TypedDict

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from gantry.background import serving_loop


class MessageEvent(TypedDict):
    """A message was created or changed: its whole current state."""

    type: Literal["chat.message"]
    message: dict[str, Any]


class QueuedEvent(TypedDict):
    """A message waits for the model; `position` is its place in the queue (1 = next)."""

    type: Literal["chat.queued"]
    message_id: int
    position: int


class TokenEvent(TypedDict):
    """A piece of an answer being generated (`message_id` is the answer's)."""

    type: Literal["chat.token"]
    message_id: int
    text: str


class DoneEvent(TypedDict):
    """An answer is complete (or was stopped: `status` says which). An answer that ended by itself also
    says why (`finish_reason`: "stop", "length"), its token counts (`usage`) and the `model` that gave it."""

    type: Literal["chat.done"]
    message_id: int
    status: str
    finish_reason: NotRequired[str | None]
    usage: NotRequired[dict[str, int] | None]
    model: NotRequired[str]


class ErrorEvent(TypedDict):
    """A message could not be answered; `detail` is the sentence shown, and Retry is offered."""

    type: Literal["chat.error"]
    message_id: int
    detail: str


class ConversationEvent(TypedDict):
    """A conversation was created, renamed or deleted."""

    type: Literal["chat.conversation"]
    conversation: dict[str, Any]
    deleted: bool


class SentEvent(TypedDict):
    """To the one page that sent a message over its socket: it was saved (`ref` is the page's own)."""

    type: Literal["chat.sent"]
    ref: Any
    message: dict[str, Any]


class RefusedEvent(TypedDict):
    """To the one page that sent a message over its socket: it was not saved, `detail` says why."""

    type: Literal["chat.refused"]
    ref: Any
    detail: str


class ModelStateEvent(TypedDict):
    """The backend's state: ready, switching, unloading, unloaded, failed or unreachable.

    `trouble` ("unreachable", "key", "answer" or None) and `trouble_text` say why TabbyAPI could not be
    asked the last time; `abandoned_load` names a model TabbyAPI still loads after a switch stopped
    waiting for it (no switch can start until that load ends).
    """

    type: Literal["model.state"]
    state: str
    active_model: str | None
    target_model: str | None
    trouble: str | None
    trouble_text: str | None
    abandoned_load: str | None
    operation_id: int | None


class ModelProgressEvent(TypedDict):
    """A step of a running switch or unload, with the line the UI shows."""

    type: Literal["model.progress"]
    operation_id: int
    step: str
    model: str | None
    percent: float
    module: int
    modules: int
    text: str
    eta_seconds: float | None


class ModelListEvent(TypedDict):
    """The list of models changed (a folder appeared or went away)."""

    type: Literal["model.list"]
    models: list[dict[str, Any]]


class BackendStateEvent(TypedDict):
    """One backend of the fleet as the Backends tab shows it (name, state, models, running answers...)."""

    type: Literal["backend.state"]
    backend: dict[str, Any]


class ChatModelsEvent(TypedDict):
    """To chat pages, for the model picker: the models served now (the default first), those being
    loaded, and the fleet's default model."""

    type: Literal["chat.models"]
    default: str | None
    served: list[str]
    loading: list[str]


class SessionEndedEvent(TypedDict):
    """To a user's sockets, not forwarded to pages: a session ended (`session_key`; None: every session of
    the user, after a password change, a deactivation or a deletion). Those sockets close."""

    type: Literal["session.ended"]
    session_key: str | None


Event = (
    MessageEvent
    | QueuedEvent
    | TokenEvent
    | DoneEvent
    | ErrorEvent
    | ConversationEvent
    | ModelStateEvent
    | ModelProgressEvent
    | ModelListEvent
    | BackendStateEvent
    | ChatModelsEvent
    | SessionEndedEvent
)

CHAT_GROUP = "chat"
MODELS_GROUP = "models"


def conversation_group(conversation_id: int) -> str:
    return f"conversation-{conversation_id}"


def user_group(user_id: int) -> str:
    return f"user-{user_id}"


def sockets_group(user_id: int) -> str:
    return f"sockets-{user_id}"


async def abroadcast(group: str, event: Event) -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(group, dict(event))


def broadcast(group: str, event: Event) -> None:
    """Send from synchronous code (a view's thread, a background task, a Celery worker)."""
    loop = serving_loop()
    if loop is not None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None:
            # Hop onto the loop that owns the sockets: the in-memory layer's queues belong to it, and a
            # send from another loop would not wake the consumers waiting on them.
            asyncio.run_coroutine_threadsafe(abroadcast(group, event), loop).result(timeout=30)
            return
    async_to_sync(abroadcast)(group, event)


class Listening:
    """A channel's events, with one receive kept running across timeouts: cancelling a receive may lose
    the message it was taking (and Redis's publish/subscribe layer unsubscribes a cancelled one)."""

    def __init__(self, layer: Any, channel: str) -> None:
        self.layer, self.channel = layer, channel
        self._receiving: asyncio.Future[dict[str, Any]] | None = None

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None when none came within `timeout` seconds."""
        if self._receiving is None:
            self._receiving = asyncio.ensure_future(self.layer.receive(self.channel))
        done, _ = await asyncio.wait({self._receiving}, timeout=max(0.0, timeout))
        if not done:
            return None
        event, self._receiving = self._receiving.result(), None
        return event

    def close(self) -> None:
        if self._receiving is not None:
            self._receiving.cancel()
            self._receiving = None
