"""Chat's figures for /metrics, read from the database when scraped: the same whichever process is
asked, and counting the held messages and running answers of every process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from chat.models import Message
from chat.queue import waiting


class ChatFigures:
    """A prometheus_client collector (see gantry.metrics.add_collector)."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gantry_queue_depth", "Messages held in the queue, waiting for the model.", value=waiting().count()
        )
        yield GaugeMetricFamily(
            "gantry_generations_running",
            "Answers being generated now, by every process.",
            value=Message.objects.answering().count(),
        )
