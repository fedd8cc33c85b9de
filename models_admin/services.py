"""Backends and their models: the TabbyAPI client from settings, the model list, state broadcasts."""

from __future__ import annotations

import asyncio
import functools
import weakref
from pathlib import Path
from typing import Any

import yaml
from django.conf import settings
from django.db import transaction
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from gantry.broadcast import CHAT_GROUP, MODELS_GROUP, ModelListEvent, ModelStateEvent, broadcast
from models_admin.models import Backend, LanguageModel, Operation
from models_admin.signals import model_ready
from models_admin.tabby_client import TabbyClient, TabbyConfig
from models_admin.tabby_errors import BackendError


def tabby_config() -> TabbyConfig:
    """TabbyAPI's address and keys: the settings, else the server's own api_tokens.yml."""
    api_key, admin_key = settings.TABBY_API_KEY, settings.TABBY_ADMIN_KEY
    if (not api_key or not admin_key) and settings.TABBY_TOKENS_FILE:
        path = Path(settings.TABBY_TOKENS_FILE)
        file_api_key, file_admin_key = _tokens(path, path.stat().st_mtime_ns)
        api_key, admin_key = api_key or file_api_key, admin_key or file_admin_key
    return TabbyConfig(
        base_url=settings.TABBY_HOST,
        api_key=api_key,
        admin_key=admin_key,
        connect_timeout=settings.TABBY_CONNECT_TIMEOUT,
        read_timeout=settings.TABBY_READ_TIMEOUT,
    )


@functools.lru_cache(maxsize=4)
def _tokens(path: Path, mtime_ns: int) -> tuple[str, str]:
    """(API key, admin key) from TabbyAPI's api_tokens.yml, read again only when the file changes."""
    tokens = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    api = tokens.get("api_key")
    return str(api[0] if isinstance(api, list) else api or ""), str(tokens.get("admin_key") or "")


_answer_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TabbyClient] = weakref.WeakKeyDictionary()


def answer_client() -> TabbyClient:
    """The running loop's client for answers, kept open: its connections to TabbyAPI are reused, so an
    answer's first token does not wait on a new connection. Callers don't close it."""
    loop = asyncio.get_running_loop()
    config = tabby_config()
    client = _answer_clients.get(loop)
    if client is None or client.config != config:
        # New keys or address: a new client. The old one is not closed, which would cut the answers
        # still streaming on it; its connections close with it once those are done.
        client = _answer_clients[loop] = TabbyClient(config)
    return client


def admin_client() -> TabbyClient:
    """A client for admin calls (close it: use as `with`)."""
    return TabbyClient(tabby_config())


def default_backend(locked: bool = False) -> Backend:
    """The one backend today; `locked` holds its row to the end of the caller's transaction."""
    backends = Backend.objects.select_for_update() if locked else Backend.objects
    backend, _ = backends.get_or_create(name="default", defaults={"base_url": settings.TABBY_HOST})
    return backend


def sync_models(strict: bool = False) -> Backend:
    """Take the model list and the loaded model from TabbyAPI (the truth is TabbyAPI's, not ours).

    When TabbyAPI cannot be asked, what Gantry knew stays; `strict` raises the BackendError instead.
    """
    backend = default_backend()
    seen = backend.updated
    try:
        with admin_client() as client:
            names = [card["id"] for card in client.list_models()]
            card = client.current_model()
    except BackendError:
        if strict:
            raise
        return backend
    changed = _record_models(backend, names)
    with transaction.atomic():
        backend = Backend.objects.select_for_update().get(pk=backend.pk)
        before = backend.as_event()
        # A running operation owns the state until it ends; one that began or ended while TabbyAPI was
        # being asked has made that answer stale (the next refresh takes a fresh one).
        if not backend.is_busy and backend.updated == seen:
            backend.active_model = card["id"] if card else ""
            backend.state = Backend.State.READY if card else Backend.State.UNLOADED
            backend.refreshed_at = timezone.now()
            backend.save(update_fields=["active_model", "state", "refreshed_at", "updated"])
    if backend.as_event() != before:
        announce_state(backend)
    if backend.is_ready:
        # Held messages (and answers orphaned by a dead process) wait for exactly this.
        model_ready.send(sender=Backend, backend_id=backend.pk, model=backend.active_model)
    if changed:
        broadcast(MODELS_GROUP, ModelListEvent(type="model.list", models=model_rows(backend)))
    return backend


def _record_models(backend: Backend, names: list[str]) -> bool:
    known = {m.name: m for m in LanguageModel.objects.filter(backend=backend)}
    changed = False
    for name in names:
        model = known.get(name)
        if model is None:
            LanguageModel.objects.create(backend=backend, name=name)
            changed = True
        elif not model.present:
            model.present = True
            model.save(update_fields=["present", "last_seen"])
            changed = True
    gone = [m.pk for name, m in known.items() if name not in names and m.present]
    LanguageModel.objects.filter(pk__in=gone).update(present=False)
    return changed or bool(gone)


def model_rows(backend: Backend) -> list[dict[str, Any]]:
    """The model list as the admin API and the Models tab show it (one query)."""
    last_load = Operation.objects.successful_loads(OuterRef("name")).values("load_seconds")[:1]
    models = LanguageModel.objects.filter(backend=backend, present=True).annotate(last_load=Subquery(last_load))
    return [
        {
            "id": model.name,
            "name": model.name,
            "active": backend.active_model == model.name and backend.state == Backend.State.READY,
            "last_load_seconds": float(model.last_load) if model.last_load is not None else None,
        }
        for model in models.order_by("name")
    ]


def announce_state(backend: Backend) -> None:
    event = ModelStateEvent(
        type="model.state",
        state=backend.state,
        active_model=backend.active_model or None,
        target_model=backend.target_model or None,
        operation_id=backend.operation_id,
    )
    broadcast(CHAT_GROUP, event)
    broadcast(MODELS_GROUP, event)


def backend_event(backend: Backend | None = None) -> dict[str, Any]:
    """The backend's state as the `model.state` event carries it (without `type`)."""
    backend = backend or default_backend()
    return {**backend.as_event(), "operation_id": backend.operation_id}
