"""How the Models app talks to the apps that depend on it, without importing them.

- `count_running_answers`: receivers return how many answers are being generated right now (with
  `backend_id`: by that backend); a switch waits (bounded) until the sum is zero before it unloads the model.
- `model_ready`: sent (with `backend_id` and `model`) when a model is loaded and verified, so held
  messages can be released.
- `model_unavailable`: sent (with `backend_id`) when the model stops serving (switch, unload, failure,
  an unreachable server).
- `count_waiting`: receivers return how many messages wait for the model; while any wait, the watchers
  check TabbyAPI every second (models_admin.watcher).
- `list_held`: receivers return the messages held now, oldest first, as `Held` rows (the model each waits
  for, since when, and who sent it): the swap scheduler's demand (models_admin.swap_scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.dispatch import Signal

count_running_answers = Signal()
model_ready = Signal()
model_unavailable = Signal()
count_waiting = Signal()
list_held = Signal()


@dataclass(frozen=True)
class Held:
    """A held message as the swap scheduler sees it: the model it waits for, when it was queued, and its
    sender (with whether they are an admin, for the model's `load_on_request`)."""

    model: str
    since: datetime
    user_id: int
    is_admin: bool
    named: bool  # its conversation (or request) named the model; False: it follows the default model


def running_answers(backend_id: int | None = None) -> int:
    """Answers being generated now (by the backend `backend_id`, or by all)."""
    return sum(int(count or 0) for _, count in count_running_answers.send(sender=None, backend_id=backend_id))


def waiting_messages() -> int:
    return sum(int(count or 0) for _, count in count_waiting.send(sender=None))


def held_messages() -> list[Held]:
    """Every held message, oldest first (from every app that holds them)."""
    answers: list[tuple[Any, Any]] = list_held.send(sender=None)
    found: list[Held] = [held for _, rows in answers for held in rows or ()]
    return sorted(found, key=lambda held: held.since)
