"""The Admin Dashboard pages: the Models tab and the Activity tab."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from models_admin.models import Operation
from models_admin.services import backend_event, default_backend, model_rows, sync_models


@staff_member_required(login_url="/login/")
def models_tab(request: HttpRequest) -> HttpResponse:
    backend = default_backend()
    if backend.refreshed_at is None:  # a fresh database: take TabbyAPI's list now, not at the first periodic refresh
        backend = sync_models()
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
def activity_tab(request: HttpRequest) -> HttpResponse:
    operations = Operation.objects.select_related("requested_by")[:200]
    return render(request, "models_admin/activity.html", {"tab": "activity", "operations": operations})
