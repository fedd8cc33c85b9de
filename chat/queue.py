"""Held messages: the gate, the queue's order and positions, and the release of answers.

Every user message is saved `queued`; `release()` then starts answers oldest first while the model is
ready and fewer than GANTRY_MAX_CONCURRENT_GENERATIONS answers run (counted in the database, so across
processes). A message is claimed with one atomic UPDATE (queued -> generating): with several web and
worker processes releasing at once, each message is answered exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from chat.balance import can_answer, default_model, model_for, pick
from chat.generation import Claimed, claim, generate, requeue
from chat.models import ANSWER_HEARTBEAT_SECONDS, Message
from gantry.background import spawn
from gantry.broadcast import QueuedEvent, broadcast, conversation_group
from gantry.metrics import HOLD_SECONDS
from models_admin.models import Backend
from models_admin.services import default_backend

log = logging.getLogger(__name__)

_release_lock: asyncio.Lock | None = None
_positions_pending = False
POSITIONS_DEBOUNCE = 0.3  # seconds: one round of position updates for a burst of queue changes


def waiting() -> Any:
    return Message.objects.filter(role=Message.Role.USER, status=Message.Status.QUEUED)


def admit(conversation_id: int, model: str, default: Backend | None = None) -> Backend | None:
    """For a new message for `model`, under the claim lock (`default`: the default backend's row, read
    with `default_backend(locked=True)`): refuse it when the queue or its author's share of it is full;
    else the backend that answers it at once (one holding the model is ready with a free slot, its
    conversation has no answer under way, and nothing for the same model waits ahead of it), or None: it
    is queued."""
    waiting, _, here, mine = Message.objects.counts_for_new_message(conversation_id)
    _refuse_when_full(waiting, mine)
    if here or (waiting and model in waiting_models(default)):
        return None
    return pick(model)


def waiting_models(default: Backend | None = None) -> set[str]:
    """The models the queued messages wait for (messages for other models are not held behind them)."""
    # Without the messages' ordering, DISTINCT gives one row per picked model, not one per message; and the
    # default model is looked up once, not once a row: both run under the claim lock for each new message.
    picked = set(waiting().order_by().values_list("conversation__model_name", flat=True).distinct())
    default_name = model_for("", default) if "" in picked else ""
    return {name or default_name for name in picked}


def check_room(conversation_id: int) -> None:
    """For a message sent again (Retry), under the backend's row lock: the limits of a new message."""
    waiting, _, _, mine = Message.objects.counts_for_new_message(conversation_id)
    _refuse_when_full(waiting, mine)


def _refuse_when_full(waiting: int, mine: int) -> None:
    # One person's share first: one account filling the queue would lock everyone else out.
    per_user = settings.GANTRY_MAX_QUEUED_PER_USER
    if mine >= per_user:
        raise ValidationError(
            f"You already have {mine:,} messages waiting for the model (the limit is {per_user:,}). "
            "Send this one once some are answered; your text is still here."
        )
    limit = settings.GANTRY_MAX_QUEUED
    if waiting >= limit:
        raise ValidationError(
            f"{limit:,} messages are already waiting for the model. Try again in a moment; your text is still here."
        )


def position(message: Message, model: str) -> int:
    """1 for the next message to be answered; only messages waiting for the same model (`model`, the
    message's) count."""
    ahead = waiting().filter(Q(created__lt=message.created) | Q(created=message.created, pk__lt=message.pk))
    default = default_model()
    same = Q(conversation__model_name=model) | (Q(conversation__model_name="") if model == default else Q(pk__in=[]))
    return int(ahead.filter(same).count()) + 1


def wake() -> None:
    """Release what can be released now (from any thread)."""
    spawn(release())


async def release() -> None:
    """Start answers for queued messages, oldest first, while the gate is open and slots are free."""
    global _release_lock
    if _release_lock is None:
        _release_lock = asyncio.Lock()
    async with _release_lock:
        while True:
            claimed = await sync_to_async(claim_next)()
            if claimed is None:
                break
            asyncio.get_running_loop().create_task(generate(claimed, then=wake))
    schedule_positions()


def release_here() -> set[int]:
    """release() from a request's thread: a message just posted that was not claimed as it was saved
    (others waited) starts, in its turn, without waiting for a hop onto the serving loop and back into a
    thread. Returns the ids of the questions it started."""
    started = set()
    while (claimed := claim_next()) is not None:
        spawn(generate(claimed, then=wake))
        started.add(claimed.answer.question.pk)
    schedule_positions()
    return started


def claim_next() -> Claimed | None:
    """Claim the oldest message that may be answered now: a backend holding its conversation's model
    (picked, or the fleet's default) is ready with a free slot. Messages for other models stay held."""
    if not any(can_answer(model) for model in waiting_models()):
        return None  # checked again below, under the lock; not so "none can"
    with transaction.atomic():
        default_backend(locked=True)  # one claimer at a time across processes
        default = default_model()
        backends: dict[str, Backend | None] = {}
        busy = _busy()
        queued = waiting().order_by("created", "id").annotate(picked=F("conversation__model_name"))
        for message in queued[: settings.GANTRY_MAX_CONCURRENT_GENERATIONS + 50]:
            # One answer at a time per conversation: a later question needs the earlier answer as context.
            if message.conversation_id in busy:
                continue
            model = message.picked or default
            if model not in backends:
                backends[model] = pick(model)
            backend = backends[model]
            if backend is None:
                continue  # held until a backend holding its model is ready
            claimed = claim(message, backend)
            if claimed is not None:
                HOLD_SECONDS.observe(claimed.answer.held)
                return claimed
            busy.add(message.conversation_id)
    return None


def _busy() -> set[int]:
    """Conversations with an answer under way, under the claim lock."""
    return set(Message.objects.generating().values_list("conversation_id", flat=True))


def schedule_positions() -> None:
    """Tell every queued message its place, once for a burst of changes."""
    global _positions_pending
    if _positions_pending:
        return
    _positions_pending = True

    async def later() -> None:
        global _positions_pending
        await asyncio.sleep(POSITIONS_DEBOUNCE)
        _positions_pending = False
        await sync_to_async(announce_positions)()

    spawn(later())


def announce_positions() -> None:
    """Tell every queued message its place among those waiting for the same model."""
    default = default_model()
    places: dict[str, int] = {}
    queued = waiting().order_by("created", "id").values_list("id", "conversation_id", "conversation__model_name")
    for message_id, conversation_id, picked in queued:
        model = picked or default
        places[model] = place = places.get(model, 0) + 1
        broadcast(conversation_group(conversation_id), QueuedEvent(type="chat.queued", message_id=message_id, position=place))


def requeue_orphans() -> int:
    """Answers whose process died (no heartbeat) go back to the queue; nothing stays "generating"."""
    stale = timezone.now() - timedelta(seconds=ANSWER_HEARTBEAT_SECONDS)
    orphans = list(
        Message.objects.filter(role=Message.Role.USER, status=Message.Status.GENERATING, updated__lt=stale).values_list("id", flat=True)
    )
    for message_id in orphans:
        requeue(message_id, "Interrupted: the server answering it stopped. It will be answered again.")
    if orphans:
        log.warning("Queued %d interrupted answer(s) again", len(orphans))
    return len(orphans)
