"""The Admin Dashboard pages: the Models tab, the Backends tab and the Activity tab."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from models_admin import fleet
from models_admin.models import Operation
from models_admin.services import backend_event, check_if_stale, default_backend, model_rows


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
    return render(request, "models_admin/backends.html", {"tab": "backends", "backends": fleet.rows()})


@staff_member_required(login_url="/login/")
def activity_tab(request: HttpRequest) -> HttpResponse:
    operations = Operation.objects.select_related("requested_by", "backend")[:200]
    return render(request, "models_admin/activity.html", {"tab": "activity", "operations": operations})
