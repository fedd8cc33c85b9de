"""The Models app's figures for /metrics and /readyz: switches from the operations' audit log, each
backend's state, and whether the model server answers.

Read when scraped, so they are exact whichever process is asked and however many processes ran the
switches. Rows deleted from the audit log leave the counts (Prometheus reads that as a reset).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime

from django.conf import settings
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gantry.metrics import histogram
from gantry.probes import PROBE_TIMEOUT, NotReady
from models_admin.models import Backend, Operation
from models_admin.services import default_backend
from models_admin.tabby_client import TabbyClient, TabbyConfig
from models_admin.tabby_errors import BackendError

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)
# (to_model, from_model, status, rolled_back, started, finished, load_seconds) of a finished switch
SwitchRow = tuple[str, str, str, bool, datetime, datetime | None, float | None]


def model_server_answers() -> None:
    """Raise NotReady unless the model server answers `GET /health` within PROBE_TIMEOUT seconds."""
    config = TabbyConfig(
        base_url=settings.TABBY_HOST,
        api_key="",
        admin_key="",
        connect_timeout=min(settings.TABBY_CONNECT_TIMEOUT, PROBE_TIMEOUT),
        read_timeout=PROBE_TIMEOUT,
    )
    try:
        with TabbyClient(config) as client:
            client.health()
    except BackendError as exc:
        log.warning("The model server does not answer its health check: %s", exc.message)
        raise NotReady("The model server (TabbyAPI) does not answer.") from exc


class ModelFigures:
    """A prometheus_client collector (see gantry.metrics.add_collector)."""

    def collect(self) -> Iterator[Metric]:
        finished = Operation.objects.filter(kind=Operation.Kind.SWITCH).exclude(status=Operation.Status.RUNNING)
        rows: list[SwitchRow] = list(
            finished.values_list("to_model", "from_model", "status", "rolled_back", "started", "finished", "load_seconds")
        )
        yield from switch_figures(rows)
        yield from backend_figures(default_backend())


def switch_figures(rows: list[SwitchRow]) -> Iterator[Metric]:
    outcomes = Counter({Operation.Status.SUCCEEDED.value: 0, Operation.Status.FAILED.value: 0})
    durations: dict[tuple[str, ...], list[float]] = defaultdict(list)
    loads: dict[tuple[str, ...], list[tuple[datetime, float]]] = defaultdict(list)
    for to_model, from_model, status, rolled_back, started, finished, load_seconds in rows:
        ended = finished or started  # every finished switch has its end time
        outcomes[status] += 1
        durations[(to_model, status)].append((ended - started).total_seconds())
        # A load that completed: the target's when the switch succeeded, the previous model's when it
        # was loaded again (a failed switch's load_seconds is then that reload's).
        loaded = to_model if status == Operation.Status.SUCCEEDED else from_model if rolled_back else ""
        if loaded and load_seconds is not None:
            loads[(loaded,)].append((ended, load_seconds))
    switches = CounterMetricFamily("gantry_model_switches", "Finished model switches, by outcome.", labels=["outcome"])
    for outcome, count in sorted(outcomes.items()):
        switches.add_metric([outcome], count)
    yield switches
    yield CounterMetricFamily(
        "gantry_rollbacks",
        "Failed switches after which the previous model was loaded again.",
        value=sum(1 for row in rows if row[3]),
    )
    yield histogram(
        "gantry_model_switch_duration_seconds",
        "Time from a switch's request to its end (drain, unload, load, verify; a failed one's rollback too),"
        " by target model and outcome.",
        ["model", "outcome"],
        durations,
        SECONDS_BUCKETS,
    )
    yield histogram(
        "gantry_model_load_seconds",
        "Time TabbyAPI took to load a model (Step 2 of a switch, or a rollback's reload), by model.",
        ["model"],
        {model: [seconds for _, seconds in found] for model, found in loads.items()},
        SECONDS_BUCKETS,
    )
    last = GaugeMetricFamily(
        "gantry_model_last_load_seconds", "How long the latest completed load of each model took.", labels=["model"]
    )
    for (model,), found in sorted(loads.items()):
        last.add_metric([model], max(found)[1])
    yield last


def backend_figures(backend: Backend) -> Iterator[Metric]:
    try:
        model_server_answers()
        up = 1.0
    except NotReady:
        up = 0.0
    answers = GaugeMetricFamily(
        "gantry_backend_up", "1 when the model server answers its health check now, else 0.", labels=["backend"]
    )
    answers.add_metric([backend.name], up)
    yield answers
    state = GaugeMetricFamily(
        "gantry_backend_state", "1 for the backend's current state, 0 for the others.", labels=["backend", "state"]
    )
    for choice in Backend.State:
        state.add_metric([backend.name, choice.value], 1.0 if backend.state == choice else 0.0)
    yield state
    active = GaugeMetricFamily(
        "gantry_backend_active_model",
        "1 for the model the backend serves (none while switching or unloaded).",
        labels=["backend", "model"],
    )
    if backend.is_ready:
        active.add_metric([backend.name, backend.active_model], 1.0)
    yield active
