"""Answers as they grow: saved together, once a second for all the answers this process streams.

An answer's stream never waits on the database. One saver task per process writes every growing answer
in one transaction (one thread hop, one commit) and, in the same round, learns which of their questions
were stopped meanwhile, possibly from another process; their streams end at their next piece. Saving
each answer from its own stream put a hundred writes a second, one thread's queue, in front of the
tokens of a hundred answers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.db import transaction
from django.utils import timezone

from chat.models import Message

SAVE_EVERY = 1.0  # seconds between saves of the growing answers (and checks for a Stop from elsewhere)
BATCH = 200  # answers per UPDATE statement (SQLite's limit on a statement's variables)


@dataclass(eq=False)
class Growing:
    """An answer being streamed: its rows' ids and its pieces so far (the list its stream appends to)."""

    reply_id: int
    question_id: int
    pieces: list[str] = field(default_factory=list)
    saved: int = 0  # pieces saved so far
    stopped: bool = False  # its question was stopped or deleted meanwhile


_growing: dict[int, Growing] = {}  # by answer (reply) id
_saver: asyncio.Task[None] | None = None


def track(reply: Message, pieces: list[str]) -> Growing:
    """Save this answer now and then from now on (`pieces` is the list its stream appends to)."""
    global _saver
    growing = _growing[reply.pk] = Growing(reply.pk, reply.reply_to_id or 0, pieces)
    if _saver is None or _saver.done():
        _saver = asyncio.get_running_loop().create_task(_save_rounds())
    return growing


def untrack(growing: Growing) -> None:
    """The answer ended: its stream saves it whole."""
    if _growing.get(growing.reply_id) is growing:
        del _growing[growing.reply_id]


def growing_answers() -> int:
    return len(_growing)


async def _save_rounds() -> None:
    global _saver
    try:
        while _growing:
            await asyncio.sleep(SAVE_EVERY)
            await save_round()
    finally:
        if _saver is asyncio.current_task():
            _saver = None


async def save_round() -> None:
    """Save every growing answer that got pieces since its last save; flag those whose question is no
    longer generating (stopped, or deleted with its conversation)."""
    answers = list(_growing.values())
    if not answers:
        return
    # Taken on the loop, where the pieces grow: the contents are consistent with the counts noted.
    contents = {g.reply_id: "".join(g.pieces) for g in answers if len(g.pieces) != g.saved}
    counts = {g.reply_id: len(g.pieces) for g in answers}
    live = await sync_to_async(_save)(contents, [g.question_id for g in answers])
    for g in answers:
        g.saved = counts[g.reply_id]
        g.stopped = g.stopped or g.question_id not in live


def _save(contents: dict[int, str], question_ids: list[int]) -> set[int]:
    """One transaction: the answers' contents (rows still generating only, so an answer that ended
    meanwhile keeps its whole content) and their questions' heartbeat. Returns the questions still
    generating."""
    now = timezone.now()
    rows = [Message(pk=reply_id, content=content, updated=now) for reply_id, content in contents.items()]
    with transaction.atomic():
        if rows:
            Message.objects.filter(status=Message.Status.GENERATING).bulk_update(rows, ["content", "updated"], batch_size=BATCH)
        questions = Message.objects.filter(pk__in=question_ids, status=Message.Status.GENERATING)
        live = set(questions.values_list("pk", flat=True))
        # Touching the questions is their answers' heartbeat (see Message.objects.answering()).
        Message.objects.filter(pk__in=live).update(updated=now)
    return live
