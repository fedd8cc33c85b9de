"""Operations on backends: what talks to TabbyAPI, broadcasts, or changes the backend's state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from django.conf import settings
from django.utils import timezone

from gantry.broadcast import CHAT_GROUP, MODELS_GROUP, ModelStateEvent, broadcast
from models_admin.models import Backend
from models_admin.tabby_client import AsyncTabbyClient, BackendError, TabbyClient, TabbyConfig


def tabby_config() -> TabbyConfig:
    """TabbyAPI's address and keys: the settings, else the server's own api_tokens.yml."""
    api_key, admin_key = settings.TABBY_API_KEY, settings.TABBY_ADMIN_KEY
    if (not api_key or not admin_key) and settings.TABBY_TOKENS_FILE:
        tokens = yaml.safe_load(Path(settings.TABBY_TOKENS_FILE).read_text(encoding="utf-8")) or {}
        api = tokens.get("api_key")
        api_key = api_key or str(api[0] if isinstance(api, list) else api or "")
        admin_key = admin_key or str(tokens.get("admin_key") or "")
    return TabbyConfig(
        base_url=settings.TABBY_HOST,
        api_key=api_key,
        admin_key=admin_key,
        connect_timeout=settings.TABBY_CONNECT_TIMEOUT,
        read_timeout=settings.TABBY_READ_TIMEOUT,
    )


def async_client() -> AsyncTabbyClient:
    return AsyncTabbyClient(tabby_config())


def sync_client() -> TabbyClient:
    return TabbyClient(tabby_config())


def default_backend() -> Backend:
    backend, _ = Backend.objects.get_or_create(name="default", defaults={"base_url": settings.TABBY_HOST})
    return backend


def refresh_backend() -> Backend:
    """Ask TabbyAPI which model is loaded and record it (the truth is TabbyAPI's, not ours)."""
    backend = default_backend()
    if backend.state in (Backend.State.SWITCHING, Backend.State.UNLOADING):
        return backend  # the running operation owns the state
    try:
        with sync_client() as client:
            card = client.current_model()
    except BackendError:
        return backend
    before = backend.as_event()
    backend.active_model = card["id"] if card else ""
    backend.state = Backend.State.READY if card else Backend.State.UNLOADED
    backend.refreshed_at = timezone.now()
    backend.save(update_fields=["active_model", "state", "refreshed_at", "updated"])
    if backend.as_event() != before:
        announce_state(backend)
    return backend


def announce_state(backend: Backend) -> None:
    event = ModelStateEvent(type="model.state", operation_id=None, **backend.as_event())
    broadcast(CHAT_GROUP, event)
    broadcast(MODELS_GROUP, event)


def backend_event() -> dict[str, Any]:
    """The backend's state as the `model.state` event carries it (without `type`)."""
    backend = default_backend()
    return {**backend.as_event(), "operation_id": None}
