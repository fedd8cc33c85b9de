"""The fleet: the backends admins add, edit, drain, resume and remove, and the reconciler that gives a
backend back the model it should hold (`desired_model`) when it returns.

Everything is in the database: any process may die, and the next round of any watcher (or Celery beat)
picks up from the rows. The `default` backend is the server of TABBY_HOST; its keys come from the settings.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from django.db import IntegrityError
from django.utils import timezone

from models_admin import operations
from models_admin.models import DEFAULT_BACKEND, Backend, Operation
from models_admin.policies import unloaded_by_policy
from models_admin.services import ALL_BACKENDS, announce_state, default_backend, sync_models
from models_admin.signals import model_ready, running_answers
from models_admin.tabby_errors import BackendError

log = logging.getLogger(__name__)
NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
# A backend whose reload just failed is left alone this long before the reconciler tries again.
RETRY_AFTER = timedelta(seconds=30)


class FleetError(Exception):
    """A request about the fleet that cannot be done: `message` says why, `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def backends() -> list[Backend]:
    """Every backend, the default first."""
    default_backend()
    return sorted(ALL_BACKENDS.fetch(), key=lambda b: (not b.is_default, b.name))


def named(name: str) -> Backend:
    backend = Backend.objects.filter(name=name).first() if name != DEFAULT_BACKEND else default_backend()
    if backend is None:
        raise FleetError(f"There is no backend named {name}.", 404)
    return backend


def rows() -> list[dict[str, Any]]:
    return [backend.as_row(running_answers(backend.pk)) for backend in backends()]


def _clean_url(url: object) -> str:
    if not isinstance(url, str) or not url.strip():
        raise FleetError("Give the backend's URL, like http://10.0.0.5:5000.")
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FleetError(f"{url} is not an http:// or https:// address of a server, like http://10.0.0.5:5000.")
    return url


def _clean_key(body: dict[str, Any], field: str, required: bool) -> str | None:
    key = body.get(field)
    if key is None and not required:
        return None
    if not isinstance(key, str) or not key.strip():
        raise FleetError(f"Give the backend's {field} (TabbyAPI's api_tokens.yml has it).")
    return key.strip()


def add(body: dict[str, Any]) -> Backend:
    """Register a backend from {"name", "url", "api_key", "admin_key"}, then take its model list."""
    name = body.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise FleetError("A backend's name is 1 to 64 lowercase letters, digits and dashes (not at either end), like gpu-2.")
    url = _clean_url(body.get("url"))
    api_key, admin_key = _clean_key(body, "api_key", True), _clean_key(body, "admin_key", True)
    if name == DEFAULT_BACKEND or Backend.objects.filter(name=name).exists():
        raise FleetError(f"There is already a backend named {name}.", 409)
    if Backend.objects.filter(base_url=url).exists() or url == default_backend().base_url:
        raise FleetError(f"A backend with the URL {url} is already registered.", 409)
    try:
        backend = Backend.objects.create(name=name, base_url=url, api_key=api_key or "", admin_key=admin_key or "")
    except IntegrityError as exc:
        raise FleetError(f"There is already a backend named {name}.", 409) from exc
    return sync_models(backend=backend)


def edit(backend: Backend, body: dict[str, Any]) -> Backend:
    """Change a backend's URL or keys (the default's come from the settings: only its rotation changes)."""
    fields: list[str] = []
    if "name" in body and body["name"] != backend.name:
        raise FleetError("A backend's name cannot change; remove it and add it again under the new name.")
    if backend.is_default and ({"url", "api_key", "admin_key"} & set(body)):
        raise FleetError("The default backend's URL and keys come from Gantry's settings (TABBY_HOST, TABBY_API_KEY, TABBY_ADMIN_KEY).")
    if "url" in body:
        backend.base_url = _clean_url(body["url"])
        fields.append("base_url")
    for field in ("api_key", "admin_key"):
        if (key := _clean_key(body, field, False)) is not None:
            setattr(backend, field, key)
            fields.append(field)
    if "in_rotation" in body:
        if not isinstance(body["in_rotation"], bool):
            raise FleetError("in_rotation is true or false.")
        backend.in_rotation = body["in_rotation"]
        fields.append("in_rotation")
    if not fields:
        raise FleetError('Send what changes, like {"url": "http://10.0.0.5:5000"} or {"api_key": "...", "admin_key": "..."}.')
    backend.save(update_fields=[*fields, "updated"])
    if {"base_url", "api_key", "admin_key"} & set(fields):
        return sync_models(backend=backend)
    return _rotated(backend)


def remove(backend: Backend) -> None:
    """Remove a backend: refused while it answers (drain it first) or runs an operation, and for the
    default, which is the server of TABBY_HOST (Gantry would find it again at once)."""
    if backend.is_default:
        only = " and the only one" if Backend.objects.count() <= 1 else ""
        raise FleetError(
            f"The default backend is the server of TABBY_HOST{only}: it cannot be removed. Drain it to take it out of rotation.",
            409,
        )
    if backend.is_busy:
        raise FleetError(f"The backend {backend.name} is running a {backend.state.replace('ing', '')}; remove it when that ends.", 409)
    running = running_answers(backend.pk)
    if running:
        plural = "s" if running != 1 else ""
        raise FleetError(
            f"The backend {backend.name} is answering {running} message{plural}: drain it first "
            f"(POST /api/admin/backends/{backend.name}/drain), then remove it once they are done.",
            409,
        )
    backend.delete()


def drain(backend: Backend) -> Backend:
    """Out of rotation: no new answer goes to it; those it is giving finish."""
    Backend.objects.filter(pk=backend.pk).update(in_rotation=False)
    backend.refresh_from_db()
    return _rotated(backend)


def resume(backend: Backend) -> Backend:
    """Back in rotation: it takes answers again (held messages move at once)."""
    Backend.objects.filter(pk=backend.pk).update(in_rotation=True)
    backend.refresh_from_db()
    return _rotated(backend)


def _rotated(backend: Backend) -> Backend:
    announce_state(backend)
    if backend.is_ready and backend.in_rotation:
        model_ready.send(sender=Backend, backend_id=backend.pk, model=backend.active_model)
    return backend


def reconcile() -> int:
    """Give the backends that lost their model (a server that came back empty) their desired model
    again; returns how many loads began. Only in a fleet: a single backend behaves as the spec says."""
    if Backend.objects.count() < 2:
        return 0
    began = 0
    lost = Backend.objects.filter(state=Backend.State.UNLOADED, operation__isnull=True, abandoned_load="", trouble="")
    for backend in lost.exclude(desired_model=""):
        if _failed_lately(backend) or unloaded_by_policy(backend):
            continue  # an idle model's unload by its policy is not undone
        try:
            # Several processes may reconcile at once: the second joins the switch the first began.
            operation = operations.request_switch(backend.desired_model, None, Operation.Source.FLEET, backend)
        except (operations.UnknownModel, operations.OperationConflict, operations.StillLoading, BackendError) as exc:
            log.warning("The backend %s could not be given %s again: %s", backend.name, backend.desired_model, exc)
            continue
        if operation is not None:
            log.info("Loading %s again on the backend %s, which came back without it", backend.desired_model, backend.name)
            began += 1
    return began


def _failed_lately(backend: Backend) -> bool:
    last = Operation.objects.filter(backend=backend).order_by("-started").first()
    return (
        last is not None
        and last.status == Operation.Status.FAILED
        and last.finished is not None
        and last.finished > timezone.now() - RETRY_AFTER
    )
