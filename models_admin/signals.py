"""How the Models app talks to the apps that depend on it, without importing them.

- `count_running_answers`: receivers return how many answers are being generated right now (with
  `backend_id`: by that backend); a switch waits (bounded) until the sum is zero before it unloads the model.
- `model_ready`: sent (with `backend_id` and `model`) when a model is loaded and verified, so held
  messages can be released.
- `model_unavailable`: sent (with `backend_id`) when the model stops serving (switch, unload, failure,
  an unreachable server).
- `count_waiting`: receivers return how many messages wait for the model; while any wait, the watchers
  check TabbyAPI every second (models_admin.watcher).
"""

from __future__ import annotations

from django.dispatch import Signal

count_running_answers = Signal()
model_ready = Signal()
model_unavailable = Signal()
count_waiting = Signal()


def running_answers(backend_id: int | None = None) -> int:
    """Answers being generated now (by the backend `backend_id`, or by all)."""
    return sum(int(count or 0) for _, count in count_running_answers.send(sender=None, backend_id=backend_id))


def waiting_messages() -> int:
    return sum(int(count or 0) for _, count in count_waiting.send(sender=None))
