"""The admin API (contract: gantry-api.md). Async views: a caller waiting for a switch holds no thread.

Anonymous callers get 401, users who are not admins 403. Scripts (no `Origin` header) need no CSRF
token; a browser request must come from this site and carry the CSRF token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from models_admin import operations
from models_admin.models import Operation
from models_admin.services import default_backend, model_rows

SWITCH_FAILED = "Failed to switch model. Is TabbyAPI available?"
UNLOAD_FAILED = "Failed to unload the model. Is TabbyAPI available?"
View = Callable[..., Any]  # an async view (Django's URL stubs know only sync ones)


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


def admin_only(view: View) -> View:
    @csrf_exempt
    @wraps(view)
    async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        user = await request.auser()
        if not user.is_authenticated:
            return detail("Log in as an admin first (POST /api/auth/login).", 401)
        if not user.is_staff:
            return detail("Only admins can manage models.", 403)
        if request.method == "POST" and (refusal := await sync_to_async(_csrf_refusal)(request)):
            return detail(refusal, 403)
        return await view(request, user, *args, **kwargs)

    return wrapper


@require_GET
@admin_only
async def models(request: HttpRequest, user: Any) -> JsonResponse:
    return JsonResponse({"models": await sync_to_async(lambda: model_rows(default_backend()))()})


def _body(request: HttpRequest) -> dict[str, Any] | None:
    try:
        body = json.loads(request.body or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


@require_POST
@admin_only
async def switch(request: HttpRequest, user: Any) -> JsonResponse:
    body = _body(request)
    model_id = body.get("model_id") if body is not None else None
    if not isinstance(model_id, str) or not model_id:
        return detail('Send a JSON body like {"model_id": "<model name>"}.', 400)
    source = Operation.Source.DASHBOARD if request.headers.get("X-Gantry-Source") == "dashboard" else Operation.Source.API
    try:
        operation = await sync_to_async(operations.request_switch)(model_id, user, source)
    except operations.UnknownModel:
        return detail(f"There is no model named {model_id}.", 404)
    except operations.OperationConflict as exc:
        return detail(f"Another operation is running ({exc.running.kind} to {exc.running.to_model or 'nothing'}); try again when it ends.", 409, operation_id=exc.running.pk)
    if operation is not None:
        operation = await wait_for(operation.pk)
        if operation.status != Operation.Status.SUCCEEDED:
            return failure(operation, SWITCH_FAILED)
    return JsonResponse({"message": f"Model switched to {model_id}", "model_id": model_id})


@require_POST
@admin_only
async def unload(request: HttpRequest, user: Any) -> JsonResponse:
    source = Operation.Source.DASHBOARD if request.headers.get("X-Gantry-Source") == "dashboard" else Operation.Source.API
    try:
        operation = await sync_to_async(operations.request_unload)(user, source)
    except operations.OperationConflict as exc:
        return detail("A model switch is running; unload when it ends.", 409, operation_id=exc.running.pk)
    if operation is not None:
        operation = await wait_for(operation.pk)
        if operation.status != Operation.Status.SUCCEEDED:
            return failure(operation, UNLOAD_FAILED)
    return JsonResponse({"message": "Model unloaded successfully"})


@require_POST
@admin_only
async def refresh(request: HttpRequest, user: Any) -> JsonResponse:
    from models_admin.services import sync_models

    backend = await sync_to_async(sync_models)()
    return JsonResponse({"models": await sync_to_async(model_rows)(backend)})


def failure(operation: Operation, message: str) -> JsonResponse:
    status = 504 if operation.error_kind in ("stalled", "interrupted") else 502
    return detail(message, status, reason=operation.error, operation_id=operation.pk, rolled_back=operation.rolled_back)


async def wait_for(operation_id: int) -> Operation:
    """Wait (without a thread) until the operation ends; a dead worker is noticed through its heartbeat."""
    get = sync_to_async(lambda: Operation.objects.get(pk=operation_id))
    while True:
        operation = await get()
        if operation.status != Operation.Status.RUNNING:
            return operation
        if await sync_to_async(Operation.objects.stale(settings.GANTRY_OPERATION_STALE_AFTER).filter(pk=operation_id).exists)():
            await sync_to_async(operations.reconcile_stale_operations)()
            continue
        await asyncio.sleep(0.02)  # a cheap indexed read; keeps the answer within ~20 ms of the end
