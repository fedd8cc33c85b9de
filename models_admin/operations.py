"""Switching and unloading models: requests, checked and recorded, and the wait for their end.

A request takes the backend's row lock, refuses a second operation (409; the same target joins the
running switch), records an Operation and hands its id to a task (models_admin.runner runs it). The
admin API and the operator commands wait for its end the same way: `wait_for_end`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gantry.background import dispatch
from gantry.broadcast import MODELS_GROUP, Listening
from gantry.serving import in_web_thread
from models_admin import tasks
from models_admin.models import Backend, LanguageModel, Operation
from models_admin.runner import reconcile_stale_operations
from models_admin.services import announce_state, default_backend, sync_models
from models_admin.signals import model_unavailable
from models_admin.tabby_errors import BackendAuthError, BackendError

WAIT_CHECK_EVERY = 1.0  # seconds between reads of a running operation while waiting for its end
BLOCKING_CHECK_EVERY = 0.2  # the same without state events to wake the wait


class UnknownModel(Exception):
    pass


class OperationConflict(Exception):
    def __init__(self, running: Operation) -> None:
        super().__init__(f"Another operation is running: {running}")
        self.running = running


class StillLoading(Exception):
    """TabbyAPI still runs a load that a switch stopped waiting for: it loads nothing else (and unloads
    nothing) until that load ends, so a new request would only stall behind it."""

    def __init__(self, backend: Backend, action: str) -> None:
        since = timezone.localtime(backend.abandoned_since).strftime("%H:%M:%S") if backend.abandoned_since else "earlier"
        self.message = (
            f"TabbyAPI is still loading {backend.abandoned_load}, which a switch stopped waiting for at {since} (it "
            f"made no progress for {settings.GANTRY_SWITCH_TIMEOUT:g} seconds). TabbyAPI goes on with that load and "
            f"cannot {action} before it ends: try again then (the Models tab shows when)."
        )
        super().__init__(self.message)


# Requests


def request_switch(
    model_name: str, user: Any = None, source: str = Operation.Source.API, backend: Backend | None = None, roll_id: int | None = None
) -> Operation | None:
    """Start a switch of a backend (None: the default) (or join its running switch to the same model);
    None when the model is already active there. `roll_id`: the fleet switch it is a step of."""
    backend = _fresh(backend)
    _refuse_while_running(backend, Operation.Kind.SWITCH, model_name)
    known = LanguageModel.objects.filter(backend=backend, name=model_name, present=True).exists()
    confirmed = False
    if not known or (backend.is_ready and backend.active_model == model_name) or backend.trouble == Backend.Trouble.KEY:
        # A folder added since the last refresh, or a "nothing to do" that TabbyAPI must confirm
        # (someone may have loaded another model on it directly), or a key TabbyAPI refused last time
        # (BackendAuthError: the list is not the server's, and a switch could only fail).
        confirmed = _confirm_with_tabby(backend)
        if confirmed and not LanguageModel.objects.filter(backend=backend, name=model_name, present=True).exists():
            raise UnknownModel(model_name)
    with transaction.atomic():
        backend = Backend.objects.select_for_update().get(pk=backend.pk)
        _refuse_while_loading(backend, "switch models")
        running = _running(backend)
        if running is not None:
            if running.kind == Operation.Kind.SWITCH and running.to_model == model_name:
                return running
            raise OperationConflict(running)
        if confirmed and backend.is_ready and backend.active_model == model_name:
            return None
        return _begin(backend, Operation.Kind.SWITCH, model_name, user, source, roll_id)


def request_unload(user: Any = None, source: str = Operation.Source.API, backend: Backend | None = None) -> Operation | None:
    """Start an unload of a backend (None: the default) (or join the running one); None when nothing is loaded."""
    backend = _fresh(backend)
    _refuse_while_running(backend, Operation.Kind.UNLOAD, "")
    confirmed = not backend.is_busy and _confirm_with_tabby(backend)
    with transaction.atomic():
        backend = Backend.objects.select_for_update().get(pk=backend.pk)
        _refuse_while_loading(backend, "unload a model")
        running = _running(backend)
        if running is not None:
            if running.kind == Operation.Kind.UNLOAD:
                return running
            raise OperationConflict(running)
        if confirmed and backend.state == Backend.State.UNLOADED and not backend.active_model:
            return None
        return _begin(backend, Operation.Kind.UNLOAD, "", user, source)


def _refuse_while_running(backend: Backend, kind: str, model_name: str) -> None:
    """Refuse at once, without the backend's row lock, when another operation is seen running.

    Taking the lock would queue the refusals behind the running operation's progress writes (SQLite's
    lock waits back off by up to 100 ms); an operation seen running cannot be the caller's to start.
    The locked check below still decides every request that gets past this one.
    """
    running = _running(backend)
    if running is not None and not (running.kind == kind and running.to_model == model_name):
        raise OperationConflict(running)
    _refuse_while_loading(backend, "switch models" if kind == Operation.Kind.SWITCH else "unload a model")


def _refuse_while_loading(backend: Backend, action: str) -> None:
    if backend.abandoned_load:
        raise StillLoading(backend, action)


def _fresh(backend: Backend | None) -> Backend:
    return default_backend() if backend is None else Backend.objects.get(pk=backend.pk)


def _confirm_with_tabby(backend: Backend) -> bool:
    """Refresh from TabbyAPI (a short wait: the caller is a page's thread); False when it cannot be asked
    (the run then tries, fails and says why: 502). A refused key is raised (BackendAuthError): no run
    could get past it."""
    try:
        sync_models(strict=True, backend=backend)
    except BackendAuthError:
        raise
    except BackendError:
        return False
    return True


def _running(backend: Backend) -> Operation | None:
    return Operation.objects.running().filter(backend=backend).order_by("-started").first()


def _begin(backend: Backend, kind: str, model_name: str, user: Any, source: str, roll_id: int | None = None) -> Operation:
    operation = Operation.objects.create(
        backend=backend,
        roll_id=roll_id,
        kind=kind,
        source=source,
        from_model=backend.active_model,
        to_model=model_name,
        requested_by=user if user is not None and user.is_authenticated else None,
        text="Waiting to start...",
    )
    backend.state = Backend.State.SWITCHING if kind == Operation.Kind.SWITCH else Backend.State.UNLOADING
    backend.target_model = model_name
    backend.operation = operation
    backend.save(update_fields=["state", "target_model", "operation", "updated"])
    transaction.on_commit(lambda: _announce_begin(backend))
    if roll_id is None:
        dispatch(tasks.run_operation, operation.pk)  # a fleet switch's step is run by the roll's runner
    return operation


def _announce_begin(backend: Backend) -> None:
    announce_state(backend)
    model_unavailable.send(sender=Backend, backend_id=backend.pk)


# Waiting


async def wait_for_end(operation_id: int, events: bool = True, check_every: float = WAIT_CHECK_EVERY) -> Operation:
    """Wait, holding no thread, until the operation ends.

    With `events`, the models group's state events wake the wait (the operation may run in another
    process). The database says whether it has ended, read at least every `check_every` seconds, which
    also notices a dead worker through the operation's heartbeat. Without a serving event loop (a
    management command), events from this process's own run come from other loops: wait without them.
    """
    layer: Any = get_channel_layer() if events else None
    channel = await layer.new_channel() if layer is not None else None
    if channel is not None:
        await layer.group_add(MODELS_GROUP, channel)  # before the first read: no state event is missed
    listening = Listening(layer, channel) if channel is not None else None
    try:
        while True:
            operation = await in_web_thread(_ended_or_none, operation_id)
            if operation is not None:
                return operation
            await _state_event(listening, check_every)
    finally:
        if listening is not None:
            listening.close()
        if channel is not None:
            await layer.group_discard(MODELS_GROUP, channel)


def wait_blocking(operation_id: int) -> Operation:
    """`wait_for_end` for callers without an event loop (operator commands). Events from this process's
    own run would come from other loops than the wait's: the database alone tells."""
    return async_to_sync(wait_for_end)(operation_id, events=False, check_every=BLOCKING_CHECK_EVERY)


def _ended_or_none(operation_id: int) -> Operation | None:
    operation = Operation.objects.get(pk=operation_id)
    if (
        operation.status == Operation.Status.RUNNING
        and Operation.objects.stale(settings.GANTRY_OPERATION_STALE_AFTER).filter(pk=operation_id).exists()
    ):
        reconcile_stale_operations()
        operation.refresh_from_db()
    return None if operation.status == Operation.Status.RUNNING else operation


async def _state_event(listening: Listening | None, timeout: float) -> None:
    """Return at the next model.state or backend.state event, or after `timeout` seconds."""
    if listening is None:
        await asyncio.sleep(timeout)
        return
    deadline = asyncio.get_running_loop().time() + timeout
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        event = await listening.next(left)
        if event is None or event["type"] in ("model.state", "backend.state"):
            return
