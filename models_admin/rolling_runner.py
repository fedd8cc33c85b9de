"""Running a fleet switch (a Roll) to its end: each backend's switch is an Operation run by
models_admin.runner, here one after the other (`rolling`) or side by side (`all`).

A backend's switch takes it out of rotation at once (it is no longer `ready`), lets its running answers
finish (GANTRY_DRAIN_TIMEOUT), unloads, loads, verifies and puts it back. The default backend goes first:
chat follows what it holds (chat.balance.default_model), so its success is the cutover, and until then
the other backends keep answering on the old model. A failure rolls that backend back (the runner's
rollback) and stops the roll; the backends not yet moved keep serving.

Every step is in the database: the roll's heartbeat says its runner lives; a roll whose runner died is
picked up by any process (models_admin.rolling.resume_stale_rolls), which goes on from the operations
already recorded.
"""

from __future__ import annotations

import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from models_admin import operations, runner
from models_admin.models import Backend, Operation, Roll
from models_admin.services import announce_state, default_backend
from models_admin.tabby_errors import BackendError

log = logging.getLogger(__name__)
POLL = 0.25  # seconds between reads of the running steps


def run_roll(roll_id: int) -> None:
    """The body of the roll's task."""
    roll = Roll.objects.get(pk=roll_id)
    if roll.status != Operation.Status.RUNNING:
        return
    try:
        failed = _all_at_once(roll) if roll.strategy == Roll.Strategy.ALL else _one_at_a_time(roll)
    except (operations.OperationConflict, operations.StillLoading, operations.UnknownModel, BackendError) as exc:
        failed = getattr(exc, "message", None) or str(exc)
    _end(roll, failed)


def _one_at_a_time(roll: Roll) -> str:
    for name in roll.backends:
        step = _step(roll, name)
        if step is None:
            continue
        (ended,) = _wait(roll, [step])
        if ended.status != Operation.Status.SUCCEEDED:
            return f"{name}: {ended.error or 'the switch failed'}"
    return ""


def _all_at_once(roll: Roll) -> str:
    steps = [step for name in roll.backends if (step := _step(roll, name)) is not None]
    ended = _wait(roll, steps)
    return "; ".join(f"{op.backend.name}: {op.error or 'the switch failed'}" for op in ended if op.status != Operation.Status.SUCCEEDED)


def _step(roll: Roll, name: str) -> Operation | None:
    """The backend's switch in this roll: begun now (run on a thread of this runner), or the one already
    recorded (a resumed roll); None when there is nothing to do (done, or the backend was removed)."""
    backend = Backend.objects.filter(name=name).first()
    if backend is None:
        return None
    last = Operation.objects.filter(roll=roll, backend=backend).order_by("-started", "-id").first()
    if last is not None:
        return None if last.status == Operation.Status.SUCCEEDED else last
    operation = operations.request_switch(roll.to_model, roll.requested_by, roll.source, backend, roll.pk)
    if operation is not None and operation.roll_id == roll.pk:
        threading.Thread(target=_run, args=(operation.pk,), name=f"roll-{roll.pk}-{name}", daemon=True).start()
    return operation


def _run(operation_id: int) -> None:
    close_old_connections()
    try:
        runner.run_operation(operation_id)
    except Exception:
        log.exception("A fleet switch's step failed")
    finally:
        close_old_connections()


def _wait(roll: Roll, steps: list[Operation]) -> list[Operation]:
    """Wait until every step has ended, beating the roll's heartbeat; a step whose process died is
    failed by the stale operations' recovery."""
    while True:
        Roll.objects.filter(pk=roll.pk).update(heartbeat=timezone.now())
        for step in steps:
            step.refresh_from_db()
        running = [step for step in steps if step.status == Operation.Status.RUNNING]
        if not running:
            return steps
        stale = Operation.objects.stale(settings.GANTRY_OPERATION_STALE_AFTER).filter(pk__in=[s.pk for s in running])
        if stale.exists():
            runner.reconcile_stale_operations()
        time.sleep(POLL)


def _end(roll: Roll, failed: str) -> None:
    status = Operation.Status.FAILED if failed else Operation.Status.SUCCEEDED
    Roll.objects.filter(pk=roll.pk, status=Operation.Status.RUNNING).update(status=status, error=failed, finished=timezone.now())
    if failed:
        log.warning("%s stopped: %s", roll, failed)
        return
    # A backend left out (away at the start) should hold the new default when it returns.
    if roll.from_model:
        Backend.objects.filter(desired_model=roll.from_model).exclude(name__in=roll.backends).update(desired_model=roll.to_model)
    announce_state(default_backend())
