"""Celery tasks of the Models app. Embedded (no broker), `gantry.background` runs them in-process."""

from __future__ import annotations

from celery import shared_task

from models_admin import services


@shared_task
def refresh_models() -> None:
    """Ask TabbyAPI what is loaded (every GANTRY_REFRESH_INTERVAL seconds)."""
    services.refresh_backend()
