"""A fleet switch whose runner died is picked up from the database: one process claims it, and the roll
goes on from the steps already recorded (no model server is asked: every step here is already over)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from models_admin import rolling, rolling_runner
from models_admin.models import Backend, Operation, Roll

pytestmark = pytest.mark.django_db
OLD, NEW = "Small-Chat-200M", "Tiny-Chat-5M"


def _fleet() -> tuple[Backend, Backend, Backend]:
    default = Backend.objects.create(name="default", base_url="http://127.0.0.1:1", state=Backend.State.READY, active_model=NEW, desired_model=NEW)
    second = Backend.objects.create(name="gpu-2", base_url="http://127.0.0.1:2", state=Backend.State.READY, active_model=OLD, desired_model=OLD)
    away = Backend.objects.create(name="gpu-3", base_url="http://127.0.0.1:3", state=Backend.State.UNREACHABLE, desired_model=OLD)
    return default, second, away


def _stale_roll() -> Roll:
    roll = Roll.objects.create(from_model=OLD, to_model=NEW, backends=["default", "gpu-2"])
    Roll.objects.filter(pk=roll.pk).update(heartbeat=timezone.now() - timedelta(seconds=settings.GANTRY_OPERATION_STALE_AFTER + 5))
    return roll


def _step(roll: Roll, backend: Backend, status: str, error: str = "") -> Operation:
    return Operation.objects.create(
        backend=backend, roll=roll, kind=Operation.Kind.SWITCH, from_model=OLD, to_model=NEW, status=status, error=error, finished=timezone.now()
    )


def test_a_stale_roll_is_claimed_once_and_ends_from_its_recorded_steps() -> None:
    default, second, away = _fleet()
    roll = _stale_roll()
    _step(roll, default, Operation.Status.SUCCEEDED)
    _step(roll, second, Operation.Status.SUCCEEDED)
    assert rolling.resume_stale_rolls() == 1
    assert rolling.resume_stale_rolls() == 0  # claimed: its heartbeat is fresh again
    rolling_runner.run_roll(roll.pk)
    roll.refresh_from_db()
    assert (roll.status, roll.error) == (Operation.Status.SUCCEEDED, "")
    # The backend that was away should hold the new default when it returns.
    away.refresh_from_db()
    assert away.desired_model == NEW
    row = rolling.roll_row(roll)
    assert (row["percent"], [b["status"] for b in row["backends"]]) == (100.0, ["succeeded", "succeeded"])


def test_a_step_interrupted_by_the_runners_death_stops_the_roll() -> None:
    default, second, _ = _fleet()
    roll = _stale_roll()
    _step(roll, default, Operation.Status.SUCCEEDED)
    _step(roll, second, Operation.Status.FAILED, "The operation was interrupted: the process running it stopped.")
    rolling_runner.run_roll(roll.pk)
    roll.refresh_from_db()
    assert roll.status == Operation.Status.FAILED
    assert roll.error == "gpu-2: The operation was interrupted: the process running it stopped."
    failed = rolling.failed_step(roll)
    assert failed is not None and failed.backend_id == second.pk
    # An ended roll is left alone.
    assert rolling.resume_stale_rolls() == 0
