"""What chat does when the Models app announces something (it never imports chat), and on failed logins."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_login_failed
from django.dispatch import receiver

from chat.balance import default_model
from chat.models import Message
from chat.queue import release_here, requeue_orphans, schedule_positions, waiting
from gantry.metrics import LOGIN_FAILURES
from models_admin.signals import Held, count_running_answers, count_waiting, list_held, model_ready, model_unavailable


@receiver(count_running_answers)
def running_answers(sender: Any, backend_id: int | None = None, **kwargs: Any) -> int:
    answering = Message.objects.answering()
    return answering.filter(backend_id=backend_id).count() if backend_id is not None else answering.count()


@receiver(count_waiting)
def waiting_messages(sender: Any, **kwargs: Any) -> int:
    return 1 if waiting().exists() else 0  # whether any waits is all the watcher asks


@receiver(list_held)
def held_messages(sender: Any, **kwargs: Any) -> list[Held]:
    """The queue as the swap scheduler reads it: each held message's model (picked, or the default), when
    it was queued (`updated`: sent, or queued again), and its sender's role."""
    rows = (
        waiting()
        .order_by("updated", "id")
        .values_list("conversation__model_name", "updated", "conversation__owner_id", "conversation__owner__is_staff")
    )
    default = ""
    held = []
    for picked, since, user_id, is_staff in rows.iterator():
        if not picked and not default:
            default = default_model()
        held.append(Held(model=picked or default, since=since, user_id=user_id, is_admin=bool(is_staff), named=bool(picked)))
    return held


@receiver(model_ready)
def release_held_messages(sender: Any, **kwargs: Any) -> None:
    """A model is ready: answers cut off by dead processes go back to the queue, and the queue moves.

    Sent after each of the watcher's checks that finds the model ready (every second while a page is
    open), so it does nothing more than look when nothing waits. Held messages are claimed here, in the
    thread that learnt the model is ready: their answers start without a hop onto the event loop and back
    into a thread."""
    if requeue_orphans() or waiting().exists():
        release_here()


@receiver(model_unavailable)
def announce_queue(sender: Any, **kwargs: Any) -> None:
    schedule_positions()


@receiver(user_login_failed)
def count_login_failure(sender: Any, **kwargs: Any) -> None:
    """Every wrong username or password, wherever it was typed (the API, the login page, Django's admin)."""
    LOGIN_FAILURES.inc()
