"""The fleet switch's Celery task. Embedded (no broker), `gantry.background` runs it in-process."""

from __future__ import annotations

from celery import shared_task

from models_admin import rolling_runner


@shared_task(acks_late=False)
def run_roll(roll_id: int) -> None:
    # Not acked late: a roll whose runner died is picked up from the database (rolling.resume_stale_rolls).
    rolling_runner.run_roll(roll_id)
