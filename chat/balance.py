"""Which backend answers a message: among the ready backends in rotation holding its model, the one with
the fewest running answers (among equals, the one that waited longest), each within its own bound
(GANTRY_MAX_CONCURRENT_GENERATIONS). With none, the message is held, as with a single backend.

A conversation follows the fleet's default model (what the default backend serves, or should serve),
unless its user picked another (`Conversation.model_name`).
"""

from __future__ import annotations

from django.conf import settings
from django.utils import timezone

from chat.models import Message
from models_admin.models import Backend
from models_admin.services import default_backend


def default_model(default: Backend | None = None) -> str:
    """The model chat answers with: the default backend's, or the one it should hold (during its switch,
    or while its server is away, the other backends holding that model keep answering). `default`: the
    default backend's row when the caller has it (read under the claim lock, say), not read again."""
    backend = default or default_backend()
    return backend.active_model if backend.is_ready else backend.desired_model


def model_for(picked: str, default: Backend | None = None) -> str:
    """The model answering a conversation that picked `picked` ("" follows the default)."""
    return picked or default_model(default)


def conversation_model(conversation_id: int, default: Backend | None = None) -> str:
    """The model answering a conversation now ("" when it no longer exists, or no model is known)."""
    return model_for(Message.objects.model_picked(conversation_id) or "", default)


def can_answer(model: str) -> bool:
    """Whether a backend is ready for `model` (without counting its free slots)."""
    return bool(model) and bool(Message.objects.serving(model))


def pick(model: str) -> Backend | None:
    """The backend for the next answer for `model`, or None (none ready, or every one at its bound).
    Called under the claim lock (the default backend's row): the counts stay true until the claim."""
    chosen, candidates = _choose(model)
    if chosen is not None and candidates > 1:
        # Ties rotate. An UPDATE, not save(): the row's `updated` is the state's version (services).
        Backend.objects.filter(pk=chosen.pk).update(routed_at=timezone.now())
    return chosen


def likely(picked: str) -> Backend | None:
    """The backend `pick` would choose now for a new conversation that picked `picked` ("": the default
    model), or None when none is free; read in one statement without the claim lock. A guess, to send a
    request before its message is saved: the claim decides (messages waiting ahead of it for the same
    model hold it, and the request is withdrawn)."""
    return likely_and_alone(picked)[0]


def likely_and_alone(picked: str) -> tuple[Backend | None, bool]:
    """`likely(picked)`, and whether that backend is the only one serving the model (then it is the one
    any claim picks while it stays so)."""
    chosen, candidates = _choose(picked, default_if_blank=True)
    return chosen, candidates == 1


def _choose(model: str, default_if_blank: bool = False) -> tuple[Backend | None, int]:
    """The free backend holding `model` with the fewest running answers (of equals, the one that waited
    longest), and how many backends serve it."""
    # The backends with their running answers, in one statement.
    serving_now = Message.objects.serving(model) if model or default_if_blank else []
    running = {backend.pk: count for backend, count in serving_now}
    limit = settings.GANTRY_MAX_CONCURRENT_GENERATIONS
    free = [backend for backend, count in serving_now if count < limit]
    chosen = min(free, key=lambda backend: running[backend.pk]) if free else None
    return chosen, len(serving_now)


def others_for(backend: Backend, model: str) -> bool:
    """Whether another backend in rotation could answer for `model` (now, or once it is loaded there):
    then an answer cut off by this backend's failure is queued again instead of failing."""
    others = Backend.objects.exclude(pk=backend.pk).filter(in_rotation=True)
    return others.filter(active_model=model).exists() or others.filter(desired_model=model).exists()
