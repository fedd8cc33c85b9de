"""What Gantry does by the models' policies (models_admin.policies), from the watchers' rounds: unloading a
model idle for its `idle_unload_after`, and loading the `preload` models when a process starts. Each is
an operation like an admin's (the Activity tab shows it with the source `policy`).

Every web process's watcher (and, in production, Celery's `watch_fleet`) looks every second; the
database decides which process acts (a conditional UPDATE for an idle unload, the backend's row lock of
every switch for a preload), so each happens once.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from django.utils import timezone

from models_admin import operations
from models_admin.models import Backend, LanguageModel, Operation, Roll
from models_admin.policies import idle_due, idle_since, policies_of, preloaded_models, unloaded_by_policy
from models_admin.tabby_errors import BackendError

log = logging.getLogger(__name__)
# How long a process that starts waits for every backend to answer before it preloads with those that did.
PRELOAD_PATIENCE = timedelta(minutes=5)
REFUSED = (operations.UnknownModel, operations.OperationConflict, operations.StillLoading, BackendError)


def unload_idle(fleet: list[Backend], now: datetime | None = None) -> list[Operation]:
    """Unload, on each backend, a model unused for its `idle_unload_after` (never a pinned one, nor one
    with an answer or an operation running, nor during a fleet switch); returns the unloads begun."""
    now = now or timezone.now()
    ready = [backend for backend in fleet if backend.is_ready]
    policies = policies_of(backend.active_model for backend in ready) if ready else {}
    due = [b for b in ready if policies[b.active_model].idle_unload_after and idle_due(b, now, policies[b.active_model])]
    # Asked only when something is due: this runs every second in every watcher.
    if not due or Roll.objects.filter(status=Operation.Status.RUNNING).exists():
        return []
    begun = []
    for backend in due:
        policy = policies[backend.active_model]
        # One process claims the unload: the clocks it read are still the row's (no answer ended since). The
        # claim restarts the idle clock, so an unload refused below is tried again after another idle time.
        claimed = Backend.objects.filter(
            pk=backend.pk, state=Backend.State.READY, active_model=backend.active_model, operation__isnull=True,
            loaded_at=backend.loaded_at, used_at=backend.used_at,
        ).update(used_at=now)
        if not claimed:
            continue
        idle = (now - (idle_since(backend) or now)).total_seconds()
        try:
            operation = operations.request_unload(None, Operation.Source.POLICY, backend)
        except REFUSED as exc:
            log.warning("The idle %s could not be unloaded from the backend %s: %s", backend.active_model, backend.name, exc)
            continue
        if operation is not None:
            log.info(
                "Unloading %s from the backend %s: no request for %.0f s (its idle_unload_after is %d s)",
                backend.active_model, backend.name, idle, policy.idle_unload_after,
            )
            begun.append(operation)
    return begun


class Preload:
    """The `preload` models, loaded once when this process starts: each that no backend holds (or is
    loading) goes to a backend that holds nothing; with none free it is left out, said in the log (nothing
    is unloaded at start). It waits until every backend has answered since the start (at most
    PRELOAD_PATIENCE), and while one shows nothing loaded in the first moments of a check (a model server
    that just started may be loading its own model: models_admin.watcher's doubt)."""

    def __init__(self) -> None:
        self.started = timezone.now()  # made when the process starts (models_admin.watcher)
        self.done = False
        self.lock = threading.Lock()  # a Celery worker's threads may run two rounds at once

    def round(self, fleet: list[Backend]) -> list[Operation]:
        if self.done or not self.lock.acquire(blocking=False):
            return []
        try:
            return self._round(fleet)
        finally:
            self.lock.release()

    def _round(self, fleet: list[Backend]) -> list[Operation]:
        if self.done:
            return []
        now = timezone.now()
        wanted = preloaded_models()
        waiting = [backend for backend in fleet if not self._settled(backend)]
        if wanted and waiting and now - self.started < PRELOAD_PATIENCE:
            return []
        self.done = True
        if waiting and wanted:
            log.warning("Preloading without the backends %s, which did not answer in time", ", ".join(b.name for b in waiting))
        return preload(wanted, [backend for backend in fleet if backend not in waiting])

    def _settled(self, backend: Backend) -> bool:
        """Whether what the backend holds is known: checked since this process started, no operation or
        abandoned load on it, answering, and not showing "nothing loaded" while that is in doubt."""
        if backend.checked_at is None or backend.checked_at < self.started:
            return False
        if backend.is_busy or backend.abandoned_load or backend.state == Backend.State.UNREACHABLE:
            return False
        return backend.is_ready or not backend.is_in_doubt


def preload(models: list[str], fleet: list[Backend]) -> list[Operation]:
    """Load each of `models` that no backend holds on a backend of `fleet` that holds nothing."""
    begun: list[Operation] = []
    for model in models:
        if any(model in (b.active_model, b.target_model, b.abandoned_load) for b in Backend.objects.all()):
            continue
        taken = {operation.backend_id for operation in begun}
        operation = _load_somewhere(model, [b for b in fleet if _free(b, len(fleet)) and b.pk not in taken])
        if operation is not None:
            begun.append(operation)
    return begun


def _free(backend: Backend, fleet_size: int) -> bool:
    """A backend that holds nothing and would not be given a model by anything else: in a fleet, one
    that should hold a model gets it back from the reconciler (models_admin.fleet)."""
    empty = backend.state == Backend.State.UNLOADED and not backend.active_model and backend.operation_id is None
    reconciled = fleet_size > 1 and bool(backend.desired_model) and not unloaded_by_policy(backend)
    return empty and not backend.trouble and not reconciled


def _load_somewhere(model: str, free: list[Backend]) -> Operation | None:
    for backend in free:
        if not LanguageModel.objects.filter(backend=backend, name=model, present=True).exists():
            continue
        try:
            operation = operations.request_switch(model, None, Operation.Source.POLICY, backend)
        except REFUSED as exc:
            log.warning("Preloading %s on the backend %s was refused: %s", model, backend.name, exc)
            continue
        if operation is not None:
            log.info("Preloading %s on the backend %s, which holds nothing", model, backend.name)
            return operation
    log.warning(
        "Not preloading %s: no backend that has it holds nothing (preloads never unload a model); load it from the Models tab",
        model,
    )
    return None
