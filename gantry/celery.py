"""The Celery app. In production it meets the web processes in Redis; embedded, it is not used."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_ready
from django.conf import settings

from gantry.metrics import start_exporter

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gantry.settings")

app = Celery("gantry")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
@beat_init.connect
def serve_metrics(**kwargs: Any) -> None:
    """Workers and beat have no web server: their figures (answers a worker generated, held messages
    it released) and /healthz are served on GANTRY_METRICS_PORT."""
    start_exporter(settings.GANTRY_METRICS_PORT)
