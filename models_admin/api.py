"""The admin API (contract: gantry-api.md). Switch and unload are async views: a caller waiting for a
switch holds no thread.

Anonymous callers get 401, users who are not admins 403. Scripts (no `Origin` header) need no CSRF
token; a browser request must come from this site and carry the CSRF token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from gantry.broadcast import MODELS_GROUP
from gantry.serving import in_web_thread
from models_admin import operations
from models_admin.models import Operation
from models_admin.services import default_backend, model_rows

SWITCH_FAILED = "Failed to switch model. Is TabbyAPI available?"
UNLOAD_FAILED = "Failed to unload the model. Is TabbyAPI available?"
View = Callable[..., Any]


def detail(message: str, status: int, **extra: Any) -> JsonResponse:
    return JsonResponse({"detail": message, **extra}, status=status)


def _csrf_refusal(request: HttpRequest) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    if origin != f"{request.scheme}://{request.get_host()}":
        return "Cross-site requests are refused."
    reason = CsrfViewMiddleware(lambda r: None).process_view(request, lambda r: None, (), {})  # type: ignore[arg-type, return-value]
    return "CSRF token missing or incorrect." if reason is not None else None


def _refusal(request: HttpRequest) -> JsonResponse | None:
    """401 for anonymous callers, 403 for users who are not admins and for refused browser POSTs."""
    user = request.user
    if not user.is_authenticated:
        return detail("Log in as an admin first (POST /api/auth/login).", 401)
    if not user.is_staff:
        return detail("Only admins can manage models.", 403)
    if request.method == "POST" and (refusal := _csrf_refusal(request)):
        return detail(refusal, 403)
    return None


def admin_only(view: View) -> View:
    @csrf_exempt
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        return _refusal(request) or view(request, *args, **kwargs)

    return wrapper


@require_GET
@admin_only
def models(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"models": model_rows(default_backend())})


def _body(request: HttpRequest) -> dict[str, Any] | None:
    try:
        body = json.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _source(request: HttpRequest) -> str:
    return Operation.Source.DASHBOARD if request.headers.get("X-Gantry-Source") == "dashboard" else Operation.Source.API


# Switch and unload answer when the operation is over. Each is an async view in two parts: the checks
# and the request, in one web thread (gantry.serving); then the wait, on the event loop, holding no thread.


@require_POST
@csrf_exempt
async def switch(request: HttpRequest) -> JsonResponse:
    return await _answer_when_over(request, _start_switch, SWITCH_FAILED)


@require_POST
@csrf_exempt
async def unload(request: HttpRequest) -> JsonResponse:
    return await _answer_when_over(request, _start_unload, UNLOAD_FAILED)


async def _answer_when_over(request: HttpRequest, start: Callable[[HttpRequest], Started | JsonResponse], failed: str) -> JsonResponse:
    started = await in_web_thread(start, request)
    if isinstance(started, JsonResponse):
        return started  # refused, or nothing to do
    operation = await wait_for(started.operation_id)
    if operation.status != Operation.Status.SUCCEEDED:
        return failure(operation, failed)
    return started.answer


@dataclass(frozen=True)
class Started:
    operation_id: int
    answer: JsonResponse  # once the operation has succeeded


def _start_switch(request: HttpRequest) -> Started | JsonResponse:
    if refusal := _refusal(request):
        return refusal
    body = _body(request)
    model_id = body.get("model_id") if body is not None else None
    if not isinstance(model_id, str) or not model_id:
        return detail('Send a JSON body like {"model_id": "<model name>"}.', 400)
    try:
        operation = operations.request_switch(model_id, request.user, _source(request))
    except operations.UnknownModel:
        return detail(f"There is no model named {model_id}.", 404)
    except operations.OperationConflict as exc:
        running = exc.running
        message = f"Another operation is running ({running.kind} to {running.to_model or 'nothing'}); try again when it ends."
        return detail(message, 409, operation_id=running.pk)
    answer = JsonResponse({"message": f"Model switched to {model_id}", "model_id": model_id})
    return answer if operation is None else Started(operation.pk, answer)


def _start_unload(request: HttpRequest) -> Started | JsonResponse:
    if refusal := _refusal(request):
        return refusal
    try:
        operation = operations.request_unload(request.user, _source(request))
    except operations.OperationConflict as exc:
        return detail("A model switch is running; unload when it ends.", 409, operation_id=exc.running.pk)
    answer = JsonResponse({"message": "Model unloaded successfully"})
    return answer if operation is None else Started(operation.pk, answer)


@require_POST
@admin_only
def refresh(request: HttpRequest) -> JsonResponse:
    from models_admin.services import sync_models

    return JsonResponse({"models": model_rows(sync_models())})


def failure(operation: Operation, message: str) -> JsonResponse:
    status = 504 if operation.error_kind in ("stalled", "interrupted") else 502
    return detail(message, status, reason=operation.error, operation_id=operation.pk, rolled_back=operation.rolled_back)


async def wait_for(operation_id: int) -> Operation:
    """Wait, holding no thread, until the operation ends.

    The models group's state events wake the wait (the operation may run in another process); the
    database says whether it has ended, read at least every WAIT_CHECK_EVERY seconds, which also
    notices a dead worker through the operation's heartbeat.
    """
    layer = get_channel_layer()
    channel = await layer.new_channel() if layer is not None else None
    if channel is not None:
        await layer.group_add(MODELS_GROUP, channel)  # before the first read: no state event is missed
    try:
        while True:
            operation = await in_web_thread(_ended_or_none, operation_id)
            if operation is not None:
                return operation
            await _state_event(layer, channel, WAIT_CHECK_EVERY)
    finally:
        if channel is not None:
            await layer.group_discard(MODELS_GROUP, channel)


WAIT_CHECK_EVERY = 1.0  # seconds


def _ended_or_none(operation_id: int) -> Operation | None:
    operation = Operation.objects.get(pk=operation_id)
    if (
        operation.status == Operation.Status.RUNNING
        and Operation.objects.stale(settings.GANTRY_OPERATION_STALE_AFTER).filter(pk=operation_id).exists()
    ):
        operations.reconcile_stale_operations()
        operation.refresh_from_db()
    return None if operation.status == Operation.Status.RUNNING else operation


async def _state_event(layer: Any, channel: str | None, timeout: float) -> None:
    """Return at the next model.state event, or after `timeout` seconds (without a channel layer: then)."""
    if channel is None:
        await asyncio.sleep(timeout)
        return
    try:
        async with asyncio.timeout(timeout):
            while (await layer.receive(channel))["type"] != "model.state":
                pass
    except TimeoutError:
        pass
