"""Backends and their models: the TabbyAPI client from settings, the model list and state, broadcasts.

The state is TabbyAPI's (what `GET /v1/model` says), kept in the database: `sync_models` takes the list
and the state; `check_backend` is the watchers' light check (models_admin.watcher), which syncs only when
TabbyAPI's answer differs from the record. A failure to ask is recorded too (`trouble`): an unreachable
server closes the chat's gate; a refused key is shown to admins with the setting to fix.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from gantry.background import in_thread
from gantry.broadcast import (
    CHAT_GROUP,
    MODELS_GROUP,
    BackendStateEvent,
    ChatModelsEvent,
    ModelListEvent,
    ModelStateEvent,
    broadcast,
)
from gantry.rows import Rows
from models_admin.clients import admin_client
from models_admin.models import DEFAULT_BACKEND, Backend, LanguageModel, Operation
from models_admin.policies import policies_of, row_fields
from models_admin.signals import model_ready, model_unavailable, running_answers
from models_admin.tabby_client import TabbyClient
from models_admin.tabby_errors import BackendAuthError, BackendError, BackendUnavailable, sentence

log = logging.getLogger(__name__)
WATCH_EVERY = 1.0  # seconds between the watchers' checks while the state is in doubt or messages wait
PAGE_CHECK_AFTER = 5.0  # seconds after a check when a page's view asks for another

# Read by every page, socket and new message: plain statements built once (gantry.rows).
ALL_BACKENDS = Rows(Backend, order_by="id")
BACKEND_NAMED = Rows(Backend, "name = %s")
BACKEND_NAMED_LOCKED = Rows(Backend, "name = %s", for_update=True)


def default_backend(locked: bool = False) -> Backend:
    """The backend of TABBY_HOST; `locked` holds its row to the end of the caller's transaction (it is
    also the lock every claim of a held message takes)."""
    # One plain statement: this runs for every new message before its answer's request goes out, and the
    # ORM takes longer to build a get_or_create than the database takes to answer it.
    found = (BACKEND_NAMED_LOCKED if locked else BACKEND_NAMED).fetch([DEFAULT_BACKEND])
    if found:
        return found[0]
    backends = Backend.objects.select_for_update() if locked else Backend.objects
    backend, _ = backends.get_or_create(name=DEFAULT_BACKEND, defaults={"base_url": settings.TABBY_HOST})
    return backend


def locked(backend: Backend | None) -> Backend:
    """A backend's row (None: the default's), held to the end of the caller's transaction."""
    if backend is None:
        return default_backend(locked=True)
    return Backend.objects.select_for_update().get(pk=backend.pk)


def sync_models(strict: bool = False, backend: Backend | None = None) -> Backend:
    """Take the model list and the loaded model from TabbyAPI (the truth is TabbyAPI's, not ours).

    Each answer is waited for at most TABBY_CHECK_TIMEOUT. When TabbyAPI cannot be asked, the failure is
    recorded for admins (an unreachable server also closes the chat's gate) and the rest of what Gantry
    knew stays; `strict` raises the BackendError too.
    """
    backend = _fresh(backend)
    seen = backend.updated
    try:
        with admin_client(quick=True, backend=backend) as client:
            # Asked with the key answers use: what chat can be served, whatever becomes of the admin key.
            card = client.current_model(key="api")
            names, admin_key_refused = _folders(client)
    except BackendError as exc:
        backend = record_trouble(exc, backend)
        if strict:
            raise
        return backend
    changed = _record_models(backend, names) if admin_key_refused is None else False
    backend = _record_state(backend, seen, card["id"] if card else "", admin_key_refused)
    if changed and backend.is_default:
        broadcast(MODELS_GROUP, ModelListEvent(type="model.list", models=model_rows(backend)))
    if admin_key_refused is not None and strict:
        raise admin_key_refused
    return backend


def _fresh(backend: Backend | None) -> Backend:
    """The backend's row as it is now (None: the default's)."""
    if backend is None:
        return default_backend()
    return Backend.objects.get(pk=backend.pk)


def _folders(client: TabbyClient) -> tuple[list[str], BackendAuthError | None]:
    """The model folders as the admin key sees them; or, when TabbyAPI refuses that key or it is only one
    of its API keys (which see only the loaded model, so every other would look unknown), the error."""
    try:
        names = [card["id"] for card in client.list_models()]
        if client.admin_key_permission() != "api":
            return names, None
    except BackendAuthError as exc:
        return [], exc
    return [], BackendAuthError(
        sentence(
            "The admin key Gantry uses is one of TabbyAPI's API keys, without admin rights (TabbyAPI shows it only "
            f"the loaded model and refuses its loads and unloads); {client.config.admin_key_fix}"
        ),
        None,
        "admin",
    )


def _record_state(backend: Backend, seen: datetime, loaded: str, key_refused: BackendAuthError | None = None) -> Backend:
    """Record what TabbyAPI has loaded (it answered) and whether it refused the admin key; announce what
    changed, and move held messages."""
    now = timezone.now()
    with transaction.atomic():
        backend = Backend.objects.select_for_update().get(pk=backend.pk)
        before = backend.as_event()
        came_back = backend.state in (Backend.State.UNREACHABLE, Backend.State.FAILED) or bool(backend.trouble)
        backend.trouble = Backend.Trouble.KEY if key_refused else Backend.Trouble.NONE
        backend.trouble_text = key_refused.message if key_refused else ""
        backend.refreshed_at = backend.checked_at = now
        fields = ["trouble", "trouble_text", "refreshed_at", "checked_at", "updated"]
        # A running operation owns the state until it ends; one that began or ended while TabbyAPI was
        # being asked has made that answer stale (the next check takes a fresh one).
        if not backend.is_busy and backend.updated == seen:
            if loaded:
                backend.doubt_until = None
                # A model is there: no load runs any more.
                backend.abandoned_load, backend.abandoned_since, backend.abandoned_beat = "", None, None
            elif backend.state != Backend.State.UNLOADED or came_back:
                # Nothing loaded, and not by Gantry's doing: TabbyAPI looks the same while a load runs
                # (one started at its start, or directly), so watch closely for a while.
                backend.doubt_until = now + timedelta(seconds=settings.GANTRY_REFRESH_INTERVAL)
            if loaded and (loaded != backend.active_model or backend.loaded_at is None):
                backend.loaded_at = now  # loaded by someone else, or first seen: the policies' clock starts
            backend.state = Backend.State.READY if loaded else Backend.State.UNLOADED
            backend.active_model = loaded
            fields += ["state", "active_model", "loaded_at", "doubt_until", "abandoned_load", "abandoned_since", "abandoned_beat"]
            if loaded and (backend.is_default or not backend.desired_model):
                # What the default serves is the fleet's default model; an added backend keeps the model
                # it should hold (first seen: the one it holds).
                backend.desired_model = loaded
                fields.append("desired_model")
        backend.save(update_fields=fields)
    if backend.as_event() != before:
        announce_state(backend)
    if backend.is_ready:
        # Held messages (and answers orphaned by a dead process) wait for exactly this.
        model_ready.send(sender=Backend, backend_id=backend.pk, model=backend.active_model)
    return backend


def record_trouble(exc: BackendError, backend: Backend | None = None) -> Backend:
    """Record that a backend's TabbyAPI (None: the default's) could not be asked, and why, for admins. An
    unreachable server also leaves the rotation (its messages are held, or answered by another backend,
    until it answers again) unless an operation owns the state."""
    kind = (
        Backend.Trouble.UNREACHABLE
        if isinstance(exc, BackendUnavailable)
        else Backend.Trouble.KEY if isinstance(exc, BackendAuthError) else Backend.Trouble.ANSWER
    )
    with transaction.atomic():
        backend = locked(backend)
        before, had = backend.as_event(), backend.trouble
        backend.trouble, backend.trouble_text, backend.checked_at = kind, exc.message, timezone.now()
        fields = ["trouble", "trouble_text", "checked_at", "updated"]
        lost = kind == Backend.Trouble.UNREACHABLE and not backend.is_busy and backend.state != Backend.State.UNREACHABLE
        if lost:
            backend.state, backend.active_model = Backend.State.UNREACHABLE, ""
            fields += ["state", "active_model"]
        backend.save(update_fields=fields)
    if had != kind:
        log.warning("TabbyAPI (%s): %s", backend.name, exc.message)
    if backend.as_event() != before:
        announce_state(backend)
    if lost:
        model_unavailable.send(sender=Backend, backend_id=backend.pk)
    return backend


def check_backend(backend: Backend | None = None) -> Backend:
    """The watchers' light check of a backend (None: the default): one `GET /v1/model` (at most
    TABBY_CHECK_TIMEOUT); a whole sync only when its answer differs from the record."""
    backend = _fresh(backend)
    try:
        with admin_client(quick=True, backend=backend) as client:
            card = client.current_model(key="api")
    except BackendError as exc:
        return record_trouble(exc, backend)
    loaded = card["id"] if card else ""
    expected = Backend.State.READY if loaded else Backend.State.UNLOADED
    # A refused admin key stays refused until the settings change: the periodic refresh tells.
    troubled = bool(backend.trouble) and backend.trouble != Backend.Trouble.KEY
    differs = not backend.is_busy and (backend.state, backend.active_model) != (expected, loaded)
    if troubled or differs or backend.refreshed_at is None or (loaded and backend.abandoned_load):
        return sync_models(backend=backend)
    if backend.is_ready:
        model_ready.send(sender=Backend, backend_id=backend.pk, model=backend.active_model)
    return backend


def request_check(seconds: float = 0.0, backend: Backend | None = None) -> None:
    """Have the watchers check a backend (None: the default) within a second, and every second for
    `seconds` more."""
    until = timezone.now() + timedelta(seconds=max(seconds, 2 * WATCH_EVERY))
    pending = Q(doubt_until__isnull=True) | Q(doubt_until__lt=until)
    Backend.objects.filter(pk=(backend or default_backend()).pk).filter(pending).update(doubt_until=until)


def check_if_stale(backend: Backend) -> None:
    """A page is about to show the model's state: have it checked within a second when nobody did for a
    few seconds, so a newcomer sees TabbyAPI's truth at once rather than at the next refresh."""
    if backend.checked_at is None or backend.checked_at < timezone.now() - timedelta(seconds=PAGE_CHECK_AFTER):
        in_thread(request_check)  # a write: the page does not wait for the database's lock


def note_nothing_loaded(backend: Backend | None = None) -> None:
    """A backend's TabbyAPI (None: the default's) just refused an answer because nothing is loaded: close
    its gate now (held messages are not sent to be refused again), and watch closely, since a load in
    progress looks the same."""
    with transaction.atomic():
        backend = locked(backend)
        if backend.state != Backend.State.READY:
            return
        backend.state, backend.active_model = Backend.State.UNLOADED, ""
        backend.doubt_until = timezone.now() + timedelta(seconds=settings.GANTRY_REFRESH_INTERVAL)
        backend.save(update_fields=["state", "active_model", "doubt_until", "updated"])
    announce_state(backend)
    model_unavailable.send(sender=Backend, backend_id=backend.pk)


def end_abandoned_load(model: str, backend: Backend | None = None) -> Backend:
    """The load a switch stopped waiting for has ended, or nobody follows it any more: take the state
    from TabbyAPI, watching closely for a while (a load nobody follows may still end)."""
    with transaction.atomic():
        backend = locked(backend)
        if backend.abandoned_load != model:
            return backend  # already ended (a check found the model loaded)
        backend.abandoned_load, backend.abandoned_since, backend.abandoned_beat = "", None, None
        backend.doubt_until = timezone.now() + timedelta(seconds=settings.GANTRY_REFRESH_INTERVAL)
        backend.save(update_fields=["abandoned_load", "abandoned_since", "abandoned_beat", "doubt_until", "updated"])
    announce_state(backend)
    return sync_models(backend=backend)


def _record_models(backend: Backend, names: list[str]) -> bool:
    known = {m.name: m for m in LanguageModel.objects.filter(backend=backend)}
    changed = False
    for name in names:
        model = known.get(name)
        if model is None:
            # Two processes (or a refresh and a watcher's check) may find the same new folder at once.
            _, created = LanguageModel.objects.get_or_create(backend=backend, name=name)
            changed = changed or created
        elif not model.present:
            model.present = True
            model.save(update_fields=["present", "last_seen"])
            changed = True
    gone = [m.pk for name, m in known.items() if name not in names and m.present]
    LanguageModel.objects.filter(pk__in=gone).update(present=False)
    return changed or bool(gone)


def model_rows(backend: Backend) -> list[dict[str, Any]]:
    """The model list as the admin API and the Models tab show it (three queries, and one for each
    backend holding a model with an idle policy); `backends` names the backends of the fleet that hold
    each model, ready; the policy fields are models_admin.policies.row_fields."""
    models = _present_models(backend)
    holding: dict[str, list[Backend]] = {}
    for holder in ALL_BACKENDS.fetch():
        if holder.state == Backend.State.READY:
            holding.setdefault(holder.active_model, []).append(holder)
    policies, now = policies_of(name for name, _ in models), timezone.now()
    return [
        {
            "id": name,
            "name": name,
            "active": backend.active_model == name and backend.state == Backend.State.READY,
            "last_load_seconds": float(last_load) if last_load is not None else None,
            "backends": [holder.name for holder in holding.get(name, [])],
            **row_fields(name, holding.get(name, []), policies, now),
        }
        for name, last_load in models
    ]


def _present_models(backend: Backend) -> list[tuple[str, Any]]:
    """The backend's models, by name, each with the duration of its last successful load (None: never
    timed), in one plain statement: the ORM took longer to build it than the database to answer it, and
    every Models tab and admin API read asks."""
    listed, operations = (connection.ops.quote_name(model._meta.db_table) for model in (LanguageModel, Operation))
    sql = (
        f"SELECT m.name, (SELECT o.load_seconds FROM {operations} o WHERE o.to_model = m.name AND o.status = %s"
        f" AND o.load_seconds IS NOT NULL ORDER BY o.finished DESC LIMIT 1) FROM {listed} m"
        " WHERE m.backend_id = %s AND m.present ORDER BY m.name"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [Operation.Status.SUCCEEDED, backend.pk])
        return [(str(name), last_load) for name, last_load in cursor.fetchall()]


def announce_state(backend: Backend) -> None:
    """A backend's new state: every backend's to the Backends tab, as `backend.state`; the default's to
    the Models tab, and the model's state as chat sees it to chat pages, as the spec's `model.state`."""
    broadcast(MODELS_GROUP, BackendStateEvent(type="backend.state", backend=backend.as_row(running_answers(backend.pk))))
    if backend.is_default:
        broadcast(MODELS_GROUP, ModelStateEvent(type="model.state", **backend_event(backend)))  # type: ignore[typeddict-item]
    elif Backend.objects.count() < 2:
        broadcast(CHAT_GROUP, ChatModelsEvent(type="chat.models", **served_models()))  # type: ignore[typeddict-item]
        return
    broadcast(CHAT_GROUP, ModelStateEvent(type="model.state", **chat_state(backend if backend.is_default else None)))  # type: ignore[typeddict-item]
    broadcast(CHAT_GROUP, ChatModelsEvent(type="chat.models", **served_models()))  # type: ignore[typeddict-item]


def backend_event(backend: Backend | None = None) -> dict[str, Any]:
    """The backend's state as the `model.state` event carries it (without `type`)."""
    backend = backend or default_backend()
    return {**backend.as_event(), "operation_id": backend.operation_id}


def chat_state(default: Backend | None = None) -> dict[str, Any]:
    """The model's state as chat pages show it (without `type`): the default backend's; in a fleet, while
    the default does not serve (it switches, is drained, or its server is away), another ready backend in
    rotation holding the default model answers the messages, so chat shows that model ready."""
    default = default or default_backend()
    event = backend_event(default)
    if default.is_ready and default.in_rotation:
        return event
    model = default.active_model if default.is_ready else default.desired_model
    others = Backend.objects.filter(state=Backend.State.READY, in_rotation=True, active_model=model).exclude(pk=default.pk)
    if model and others.exists():
        quiet = dict.fromkeys(("target_model", "trouble", "trouble_text", "abandoned_load", "operation_id"))
        return {**event, **quiet, "state": Backend.State.READY, "active_model": model}
    if default.is_ready:
        return {**event, "state": Backend.State.DRAINING}  # drained, and nobody else answers: "Model not available"
    return event


def served_models() -> dict[str, Any]:
    """The chat page's model picker (without `type`): `served`, the models a ready backend in rotation
    holds, the default first; `loading`, those a backend is loading; `default`, the fleet's default model
    (the default backend's, or the one it should hold)."""
    # Every page and socket asks: one read of the backends' few rows, not one query per question.
    backends = ALL_BACKENDS.fetch()
    default = next((backend for backend in backends if backend.is_default), None) or default_backend()  # made on first use
    default_model = default.active_model if default.is_ready else default.desired_model
    served = sorted({b.active_model for b in backends if b.is_ready and b.in_rotation}, key=lambda name: (name != default_model, name))
    loading = {b.target_model for b in backends if b.state == Backend.State.SWITCHING and b.target_model}
    loading |= {b.abandoned_load for b in backends if b.abandoned_load}
    return {"default": default_model or None, "served": served, "loading": sorted(loading - set(served))}


def known_model(name: str) -> bool:
    """Whether any backend ever listed a model of this name."""
    return LanguageModel.objects.filter(name=name).exists()
