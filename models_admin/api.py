"""The admin API (contract: gantry-api.md). Switch and unload are async views: a caller waiting for a
switch holds no thread.

Every view is wrapped in `admin_api`, for sync and async views alike: anonymous callers get 401, users
who are not admins 403, and a browser's POST must come from this site with the CSRF token (scripts,
with no `Origin` header, need none: gantry/origins.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from gantry import origins
from gantry.parsers import loads
from gantry.serving import in_web_thread
from models_admin import operations, rolling
from models_admin.models import Backend, Operation, Roll
from models_admin.services import default_backend, model_rows, sync_models
from models_admin.tabby_errors import BackendAuthError, BackendError

SWITCH_FAILED = "Failed to switch model. Is TabbyAPI available?"
UNLOAD_FAILED = "Failed to unload the model. Is TabbyAPI available?"
LIST_FAILED = "Failed to read the model list from TabbyAPI."
REFRESH_FAILED = "Failed to refresh the model list from TabbyAPI; `models` is what Gantry knew."
View = Callable[..., Any]


def detail(message: str, status: int, **extra: Any) -> JsonResponse:
    return JsonResponse({"detail": message, **extra}, status=status)


def _refusal(request: HttpRequest) -> JsonResponse | None:
    """401 for anonymous callers, 403 for users who are not admins and for refused browser writes."""
    user = request.user
    if not user.is_authenticated:
        return detail("Log in as an admin first (POST /api/auth/login).", 401)
    if not user.is_staff:
        return detail("Only admins can manage models.", 403)
    writes = request.method not in ("GET", "HEAD", "OPTIONS")
    if writes and (refusal := origins.refusal(request)):
        return detail(refusal, 403)
    if writes and request.body and request.content_type != "application/json":
        # A body is JSON, said so: a page of another site can send a form or text/plain body without
        # asking first, but not application/json.
        return detail("Send the body as JSON, with the header Content-Type: application/json.", 415)
    return None


def admin_api(view: View | None = None, *, start: View | None = None) -> Any:
    """The access rules of every admin view. An async view's checks (the session's user) run in a web
    thread, its own work then on the loop; with `start`, its first step in the same web thread (the rules,
    then `start(request, ...)`, one hop: behind a queue of pages, each hop waits its turn): the view
    gets what `start` returned, unless that is an answer already (a refusal)."""
    if view is None:
        return lambda view: admin_api(view, start=start)
    if iscoroutinefunction(view):

        def first_step(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            refusal = _refusal(request)
            return refusal if refusal is not None or start is None else start(request, *args, **kwargs)

        @wraps(view)
        async def async_checked(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
            begun = await in_web_thread(partial(first_step, request, *args, **kwargs))
            if isinstance(begun, JsonResponse):
                return begun
            return await (view(request, begun, *args, **kwargs) if start is not None else view(request, *args, **kwargs))

        return csrf_exempt(async_checked)

    @wraps(view)
    def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        return _refusal(request) or view(request, *args, **kwargs)

    return csrf_exempt(checked)


@require_GET
@admin_api
def models(request: HttpRequest) -> JsonResponse:
    backend = default_backend()
    if backend.trouble == Backend.Trouble.KEY:
        # The list Gantry has may not be the server's (an API key sees only the loaded model): say why.
        return detail(LIST_FAILED, 502, reason=backend.trouble_text)
    return JsonResponse({"models": model_rows(backend)})


@require_POST
@admin_api
def refresh(request: HttpRequest) -> JsonResponse:
    # In a page's thread: the sync waits at most TABBY_CHECK_TIMEOUT for each answer.
    try:
        backend = sync_models(strict=True)
    except BackendError as exc:
        backend = default_backend()
        rows = [] if backend.trouble == Backend.Trouble.KEY else model_rows(backend)
        return detail(REFRESH_FAILED, 502, reason=exc.message, models=rows)
    return JsonResponse({"models": model_rows(backend)})


# Switch and unload answer when the operation is over: the request is made in a web thread
# (gantry.serving), then the wait runs on the event loop, holding no thread.


@dataclass(frozen=True)
class Begun:
    """A switch or unload requested: its operation (None: nothing to do), or the fleet switch's roll."""

    operation: Operation | None = None
    roll: Roll | None = None
    fleet: bool = False


def begin_switch(request: HttpRequest) -> Begun | JsonResponse:
    body = body_of(request)
    model_id = requested_model(body)
    if model_id is None:
        return detail(MODEL_BODY, 400)
    strategy = body.get("strategy", Roll.Strategy.ROLLING) if body is not None else Roll.Strategy.ROLLING
    if strategy not in Roll.Strategy.values:
        return detail('The strategy is "rolling" (the default: one backend at a time, the others answering) or "all".', 400)
    try:
        if rolling.is_fleet():
            return Begun(roll=rolling.request_roll(model_id, request.user, source_of(request), strategy), fleet=True)
        return Begun(operation=operations.request_switch(model_id, request.user, source_of(request)))
    except rolling.RollConflict as exc:
        message = f"Another fleet switch is running (to {exc.running.to_model}); try again when it ends."
        return detail(message, 409, roll_id=exc.running.pk)
    except SWITCH_REFUSALS as exc:
        return switch_refused(exc, model_id)


@require_POST
@admin_api(start=begin_switch)
async def switch(request: HttpRequest, begun: Begun) -> JsonResponse:
    model_id = requested_model(body_of(request))
    answer = {"message": f"Model switched to {model_id}", "model_id": model_id}
    if not begun.fleet:
        return await when_over(begun.operation, JsonResponse(answer), SWITCH_FAILED)
    if begun.roll is None:
        return JsonResponse({**answer, "roll_id": None})
    ended = await rolling.wait_for_roll(begun.roll.pk)
    if ended.status == Operation.Status.SUCCEEDED:
        return JsonResponse({**answer, "roll_id": begun.roll.pk})
    step = await in_web_thread(rolling.failed_step, ended)
    rolled_back = step.rolled_back if step else False
    return detail(SWITCH_FAILED, 502, reason=ended.error, roll_id=ended.pk, operation_id=step.pk if step else None, rolled_back=rolled_back)


MODEL_BODY = 'Send a JSON body like {"model_id": "<model name>"}.'
# What refuses a switch before it begins: an unknown model, a refused key, a load TabbyAPI still runs,
# another operation.
SWITCH_REFUSALS = (operations.UnknownModel, BackendAuthError, operations.StillLoading, operations.OperationConflict)


def requested_model(body: dict[str, Any] | None) -> str | None:
    model_id = body.get("model_id") if body is not None else None
    return model_id if isinstance(model_id, str) and model_id else None


def switch_refused(exc: Exception, model_id: str, backend: str = "") -> JsonResponse:
    """The answer to a switch refused before it began (`backend`: the one backend it was for, if any)."""
    if isinstance(exc, operations.UnknownModel):
        return detail(f"The backend {backend} has no model named {model_id}." if backend else f"There is no model named {model_id}.", 404)
    if isinstance(exc, BackendAuthError):
        return detail(SWITCH_FAILED, 502, reason=exc.message)
    if isinstance(exc, operations.StillLoading):
        return detail(exc.message, 409)
    assert isinstance(exc, operations.OperationConflict)
    running, where = exc.running, f" on {backend}" if backend else ""
    message = f"Another operation is running{where} ({running.kind} to {running.to_model or 'nothing'}); try again when it ends."
    return detail(message, 409, operation_id=running.pk)


def begin_unload(request: HttpRequest) -> Begun | JsonResponse:
    try:
        return Begun(operation=operations.request_unload(request.user, source_of(request)))
    except BackendAuthError as exc:
        return detail(UNLOAD_FAILED, 502, reason=exc.message)
    except operations.StillLoading as exc:
        return detail(exc.message, 409)
    except operations.OperationConflict as exc:
        return detail("A model switch is running; unload when it ends.", 409, operation_id=exc.running.pk)


@require_POST
@admin_api(start=begin_unload)
async def unload(request: HttpRequest, begun: Begun) -> JsonResponse:
    return await when_over(begun.operation, JsonResponse({"message": "Model unloaded successfully"}), UNLOAD_FAILED)


async def when_over(operation: Operation | None, answer: JsonResponse, failed: str) -> JsonResponse:
    """`answer` once the operation has succeeded (None: there was nothing to do), else why it failed."""
    if operation is not None:
        ended = await operations.wait_for_end(operation.pk)
        if ended.status != Operation.Status.SUCCEEDED:
            return failure(ended, failed)
    return answer


def body_of(request: HttpRequest) -> dict[str, Any] | None:
    try:
        body = loads(request.body or b"null")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def source_of(request: HttpRequest) -> str:
    return Operation.Source.DASHBOARD if request.headers.get("X-Gantry-Source") == "dashboard" else Operation.Source.API


def failure(operation: Operation, message: str) -> JsonResponse:
    status = 504 if operation.error_kind in ("stalled", "interrupted") else 502
    return detail(message, status, reason=operation.error, operation_id=operation.pk, rolled_back=operation.rolled_back)
