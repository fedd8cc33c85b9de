"""The fleet's periodic task (production: Celery beat, every second): the watcher's round from a worker,
so the backends are checked, and a returning one given its desired model, even while no web process
has a reason to look. Embedded, every web process runs the same round on a thread of its own."""

from __future__ import annotations

from celery import shared_task

from models_admin.watcher import watch_round


@shared_task(acks_late=False, ignore_result=True)
def watch_fleet() -> None:
    watch_round()
