"""The Backends API (admin session, the errors and shapes of the admin API): the fleet's servers, and the
actions on one of them. Keys are write-only: no answer ever carries them.

- `GET /api/admin/backends` → `{"backends": [row, ...], "roll": the latest fleet switch or null}`; `POST` `{"name", "url", "api_key", "admin_key"}` → 201.
- `GET`/`PATCH`/`DELETE /api/admin/backends/<name>/`.
- `POST /api/admin/backends/<name>/drain`, `/resume`, `/unload`, `/switch {"model_id"}`.
"""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_http_methods, require_POST

from models_admin import fleet, operations, rolling
from models_admin.api import (
    MODEL_BODY,
    SWITCH_FAILED,
    SWITCH_REFUSALS,
    UNLOAD_FAILED,
    Begun,
    admin_api,
    body_of,
    detail,
    requested_model,
    source_of,
    switch_refused,
    when_over,
)
from models_admin.models import Backend
from models_admin.signals import running_answers
from models_admin.tabby_errors import BackendAuthError

BODY = 'Send a JSON body like {"name": "gpu-2", "url": "http://10.0.0.5:5000", "api_key": "...", "admin_key": "..."}.'


def _row(backend: Backend) -> dict[str, object]:
    backend.refresh_from_db()
    return backend.as_row(running_answers(backend.pk))


@require_http_methods(["GET", "POST"])
@admin_api
def backends(request: HttpRequest) -> JsonResponse:
    if request.method == "GET":
        return JsonResponse({"backends": fleet.rows(), "roll": rolling.latest_roll()})
    body = body_of(request)
    if body is None:
        return detail(BODY, 400)
    try:
        backend = fleet.add(body)
    except fleet.FleetError as exc:
        return detail(exc.message, exc.status)
    return JsonResponse({"backend": _row(backend)}, status=201)


@require_http_methods(["GET", "PATCH", "DELETE"])
@admin_api
def backend(request: HttpRequest, name: str) -> JsonResponse:
    try:
        found = fleet.named(name)
        if request.method == "GET":
            return JsonResponse({"backend": _row(found)})
        if request.method == "DELETE":
            fleet.remove(found)
            return JsonResponse({"message": f"Backend {name} removed"})
        body = body_of(request)
        if body is None:
            return detail('Send a JSON body with what changes, like {"url": "http://10.0.0.5:5000"}.', 400)
        return JsonResponse({"backend": _row(fleet.edit(found, body))})
    except fleet.FleetError as exc:
        return detail(exc.message, exc.status)


@require_POST
@admin_api
def drain(request: HttpRequest, name: str) -> JsonResponse:
    try:
        return JsonResponse({"backend": _row(fleet.drain(fleet.named(name)))})
    except fleet.FleetError as exc:
        return detail(exc.message, exc.status)


@require_POST
@admin_api
def resume(request: HttpRequest, name: str) -> JsonResponse:
    try:
        return JsonResponse({"backend": _row(fleet.resume(fleet.named(name)))})
    except fleet.FleetError as exc:
        return detail(exc.message, exc.status)


# Switch and unload of one backend answer when the operation is over, as the Models API's do.


def begin_switch(request: HttpRequest, name: str) -> Begun | JsonResponse:
    model_id = requested_model(body_of(request))
    if model_id is None:
        return detail(MODEL_BODY, 400)
    try:
        return Begun(operation=operations.request_switch(model_id, request.user, source_of(request), fleet.named(name)))
    except fleet.FleetError as exc:
        return detail(exc.message, exc.status)
    except SWITCH_REFUSALS as exc:
        return switch_refused(exc, model_id, name)


@require_POST
@admin_api(start=begin_switch)
async def switch(request: HttpRequest, begun: Begun, name: str) -> JsonResponse:
    model_id = requested_model(body_of(request))
    answer = JsonResponse({"message": f"Backend {name} switched to {model_id}", "model_id": model_id, "backend": name})
    return await when_over(begun.operation, answer, SWITCH_FAILED)


def begin_unload(request: HttpRequest, name: str) -> Begun | JsonResponse:
    try:
        return Begun(operation=operations.request_unload(request.user, source_of(request), fleet.named(name)))
    except fleet.FleetError as exc:
        return detail(exc.message, exc.status)
    except BackendAuthError as exc:
        return detail(UNLOAD_FAILED, 502, reason=exc.message)
    except operations.StillLoading as exc:
        return detail(exc.message, 409)
    except operations.OperationConflict as exc:
        return detail(f"A model switch is running on {name}; unload when it ends.", 409, operation_id=exc.running.pk)


@require_POST
@admin_api(start=begin_unload)
async def unload(request: HttpRequest, begun: Begun, name: str) -> JsonResponse:
    return await when_over(begun.operation, JsonResponse({"message": f"Model unloaded from backend {name}", "backend": name}), UNLOAD_FAILED)
