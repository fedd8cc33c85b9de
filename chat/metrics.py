"""Chat's figures for /metrics, read from the database when scraped: the same whichever process is
asked, and counting the held messages, running answers and usage of every process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from chat.models import Message
from chat.queue import waiting
from chat.usage import totals

# (name, the counter of chat.usage, help)
USAGE = (
    ("gantry_usage_requests", "requests", "Answered requests (chat messages and API requests), by user and model."),
    (
        "gantry_usage_prompt_tokens",
        "prompt_tokens",
        "Prompt tokens of answered requests, as the model server counted them, by user and model.",
    ),
    (
        "gantry_usage_completion_tokens",
        "completion_tokens",
        "Tokens of the answers, as the model server counted them, by user and model.",
    ),
    (
        "gantry_usage_hold_seconds",
        "hold_seconds",
        "Time answered requests were held, from their post to their answer's request, by user and model.",
    ),
    ("gantry_usage_generation_seconds", "generation_seconds", "Time from answers' requests to their end, by user and model."),
)


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
        yield from usage_figures()


def usage_figures() -> Iterator[Metric]:
    """The Usage table's totals as counters (a deleted user's rows leave them: Prometheus reads a reset)."""
    rows = totals()
    for name, counter, documentation in USAGE:
        family = CounterMetricFamily(name, documentation, labels=["user", "model"])
        for row in rows:
            family.add_metric([row["user"], row["model"]], float(row[counter]))  # type: ignore[literal-required]
        yield family
