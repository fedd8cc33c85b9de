"""Celery tasks of the Models app. Embedded (no broker), `gantry.background` runs them in-process."""

from __future__ import annotations

from celery import shared_task

from models_admin import runner, services


@shared_task
def refresh_models() -> None:
    """Every GANTRY_REFRESH_INTERVAL seconds: recover dead operations, then take TabbyAPI's model list."""
    runner.reconcile_stale_operations()
    services.sync_models()


@shared_task(acks_late=False)
def run_operation(operation_id: int) -> None:
    # Not acked late: a redelivered switch would repeat unloads and loads; a dead one is reconciled.
    runner.run_operation(operation_id)
