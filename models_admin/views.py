"""The Admin Dashboard pages: the Models tab (with each model's Settings page), the Backends tab and the
Activity tab."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth import get_user_model
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from gantry.rows import Rows
from models_admin import fleet, rolling
from models_admin.model_settings import SettingsChange
from models_admin.models import Operation
from models_admin.services import ALL_BACKENDS, backend_event, check_if_stale, default_backend, model_rows
from models_admin.settings_api import is_known, recent_changes, settings_document
from models_admin.settings_fields import FIELDS, GENERATION, LOAD, POLICY

ACTIVITY_ROWS = 200
# The Activity tab's rows, newest first (each table's own order), by plain statements built once (gantry.rows).
LATEST_OPERATIONS = Rows(Operation, order_by="started DESC, id DESC", limit=ACTIVITY_ROWS)
LATEST_CHANGES = Rows(SettingsChange, order_by="created DESC, id DESC", limit=ACTIVITY_ROWS)


@staff_member_required(login_url="/login/")
def models_tab(request: HttpRequest) -> HttpResponse:
    backend = default_backend()
    # What Gantry knows now; the watchers check TabbyAPI within a second (and take its list on a fresh
    # database), and the page draws what changes from its socket. Not here: a model server that does not
    # answer would hold the page.
    check_if_stale(backend)
    running = backend.operation
    context = {
        "tab": "models",
        "rows": model_rows(backend),
        "state": backend_event(backend),
        "running": {"id": running.pk, "kind": running.kind, "to_model": running.to_model, "step": running.step,
                    "percent": running.percent, "text": running.text} if running else None,
    }
    return render(request, "models_admin/models.html", context)


@staff_member_required(login_url="/login/")
def backends_tab(request: HttpRequest) -> HttpResponse:
    """The fleet: every backend's state, model and running answers, its actions, and the Add form."""
    return render(request, "models_admin/backends.html", {"tab": "backends", "backends": fleet.rows(), "roll": rolling.latest_roll()})


@staff_member_required(login_url="/login/")
def activity_tab(request: HttpRequest) -> HttpResponse:
    # Who asked and on which backend, in two reads for the whole page (not a join built per row); the
    # backends first: one removed meanwhile takes its operations with it.
    backends = {backend.pk: backend for backend in ALL_BACKENDS.fetch()}
    operations, changes = LATEST_OPERATIONS.fetch(), LATEST_CHANGES.fetch()
    rows: list[Operation | SettingsChange] = [*operations, *changes]
    users = get_user_model().objects.in_bulk({row.requested_by_id for row in rows if row.requested_by_id})
    for row in rows:
        row.requested_by = users.get(row.requested_by_id) if row.requested_by_id else None
    for operation in operations:
        if operation.backend_id in backends:  # else one added meanwhile: read when the page asks
            operation.backend = backends[operation.backend_id]
    # One log, newest first: switches and unloads (`started`), settings changes (`created`).
    timed: list[tuple[datetime, dict[str, Any]]] = [(op.started, {"operation": op}) for op in operations]
    timed += [(change.created, {"change": change}) for change in changes]
    entries = [entry for _, entry in sorted(timed, key=lambda pair: pair[0], reverse=True)[:ACTIVITY_ROWS]]
    return render(request, "models_admin/activity.html", {"tab": "activity", "entries": entries})


@staff_member_required(login_url="/login/")
def settings_page(request: HttpRequest, model_id: str) -> HttpResponse:
    if not is_known(model_id):
        raise Http404(f"There is no model named {model_id}.")
    document = settings_document(model_id)
    groups = [
        ("Load parameters", "Sent with every load of this model (a switch to it, a rollback).", LOAD),
        ("Generation defaults", "Used for every chat answer by this model, where the request sets nothing.", GENERATION),
        ("Policies", "What Gantry itself does with this model: keep it loaded, unload it when idle, load it at start.", POLICY),
    ]
    context = {
        "tab": "models",
        "model_id": model_id,
        "document": document,
        "groups": [(title, text, [f for f in FIELDS if f.group == group]) for title, text, group in groups],
        "changes": recent_changes(model_id),
    }
    return render(request, "models_admin/model_settings.html", context)
