"""Switching the fleet's default model: with one backend, the switch of the spec (models_admin.operations);
with several, a Roll (models_admin.rolling_runner) that moves the backends serving the old default to the
new one, one at a time (`rolling`, the default: no message waits for a model) or all at once (`all`).

A request is checked and recorded here, and its runner dispatched; a roll whose runner died is picked up
again by whichever process sees it stale (the watchers' round, or a caller waiting for its end).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gantry.background import dispatch
from gantry.serving import in_web_thread
from models_admin import fleet, operations, roll_tasks
from models_admin.models import Backend, LanguageModel, Operation, Roll
from models_admin.services import default_backend, sync_models

WAIT_CHECK_EVERY = 0.5  # seconds between reads of a running roll while waiting for its end


class RollConflict(Exception):
    def __init__(self, running: Roll) -> None:
        super().__init__(f"Another fleet switch is running: {running}")
        self.running = running


def is_fleet() -> bool:
    """Whether several backends are registered (a single one switches exactly as the spec says)."""
    default_backend()
    return Backend.objects.count() > 1


def request_roll(model_name: str, user: Any = None, source: str = Operation.Source.API, strategy: str = Roll.Strategy.ROLLING) -> Roll | None:
    """Start a fleet switch to `model_name` (or join the running one to it); None when every backend
    serving the default model already holds it."""
    default = default_backend()
    old = default.active_model if default.is_ready else default.desired_model
    if not LanguageModel.objects.filter(name=model_name, present=True).exists():
        sync_models(backend=default)
        if not LanguageModel.objects.filter(name=model_name, present=True).exists():
            raise operations.UnknownModel(model_name)
    # The backends serving the default model, and those a stopped roll left on its old model.
    olds = {old} | {roll.from_model for roll in Roll.objects.order_by("-started", "-id")[:1] if roll.status == Operation.Status.FAILED}
    olds.discard("")
    moving = [default] + [
        b for b in fleet.backends() if not b.is_default and b.state != Backend.State.UNREACHABLE and olds & {b.active_model, b.desired_model}
    ]
    with transaction.atomic():
        default_backend(locked=True)
        running = Roll.objects.filter(status=Operation.Status.RUNNING).first()
        if running is not None:
            if running.to_model == model_name:
                return running
            raise RollConflict(running)
        for backend in moving:
            if (other := Operation.objects.running().filter(backend=backend).first()) is not None:
                raise operations.OperationConflict(other)
        if all(b.is_ready and b.active_model == model_name for b in moving):
            return None
        roll = Roll.objects.create(
            strategy=strategy,
            source=source,
            requested_by=user if user is not None and user.is_authenticated else None,
            from_model=old,
            to_model=model_name,
            backends=[b.name for b in moving],
        )
        dispatch(roll_tasks.run_roll, roll.pk)
    return roll


async def wait_for_roll(roll_id: int) -> Roll:
    """Wait, holding no thread, until the roll ends."""
    while True:
        roll = await in_web_thread(_ended_or_none, roll_id)
        if roll is not None:
            return roll
        await asyncio.sleep(WAIT_CHECK_EVERY)


def _ended_or_none(roll_id: int) -> Roll | None:
    roll = Roll.objects.get(pk=roll_id)
    if roll.status == Operation.Status.RUNNING:
        resume_stale_rolls()
        return None
    return roll


def resume_stale_rolls() -> int:
    """Dispatch again the rolls whose runner gave no sign of life for GANTRY_OPERATION_STALE_AFTER
    seconds (one process claims each); returns how many."""
    since = timezone.now() - timedelta(seconds=settings.GANTRY_OPERATION_STALE_AFTER)
    resumed = 0
    for roll in Roll.objects.filter(status=Operation.Status.RUNNING, heartbeat__lt=since):
        if Roll.objects.filter(pk=roll.pk, heartbeat=roll.heartbeat).update(heartbeat=timezone.now()):
            dispatch(roll_tasks.run_roll, roll.pk)
            resumed += 1
    return resumed


def failed_step(roll: Roll) -> Operation | None:
    return Operation.objects.filter(roll=roll).exclude(status=Operation.Status.SUCCEEDED).order_by("-started", "-id").first()


def roll_row(roll: Roll) -> dict[str, Any]:
    """The roll with each backend's step (its progress, as the Backends API and tab show it)."""
    steps = {op.backend.name: op for op in Operation.objects.filter(roll=roll).select_related("backend").order_by("started", "id")}
    rows = []
    for name in roll.backends:
        op = steps.get(name)
        rows.append(
            {
                "name": name,
                "operation_id": op.pk if op else None,
                "status": op.status if op else "waiting",
                "step": op.step if op else "queued",
                "percent": (100.0 if op.status == Operation.Status.SUCCEEDED else op.percent) if op else 0.0,
                "text": op.text if op else "Waiting for its turn...",
                "rolled_back": op.rolled_back if op else False,
            }
        )
    return {
        "id": roll.pk,
        "status": roll.status,
        "strategy": roll.strategy,
        "from_model": roll.from_model or None,
        "to_model": roll.to_model,
        "error": roll.error or None,
        "percent": round(sum(r["percent"] for r in rows) / max(len(rows), 1), 1),
        "backends": rows,
        "started": roll.started.isoformat(),
        "finished": roll.finished.isoformat() if roll.finished else None,
    }


def latest_roll() -> dict[str, Any] | None:
    roll = Roll.objects.order_by("-started", "-id").first()
    return roll_row(roll) if roll is not None else None
