"""The Models app's figures for /metrics and /readyz: switches from the operations' audit log, each
backend's state, model, running answers and latest load, and whether each backend's server answers.

Read when scraped, so they are exact whichever process is asked and however many processes ran the
switches. Rows deleted from the audit log leave the counts (Prometheus reads that as a reset).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from gantry.metrics import histogram
from gantry.probes import PROBE_TIMEOUT, NotReady
from models_admin import fleet
from models_admin.models import DEFAULT_BACKEND, Backend, Operation
from models_admin.signals import running_answers
from models_admin.tabby_client import TabbyClient, TabbyConfig
from models_admin.tabby_errors import BackendError

log = logging.getLogger(__name__)

SECONDS_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)
# (to_model, from_model, status, rolled_back, started, finished, load_seconds, backend_id) of a finished switch
SwitchRow = tuple[str, str, str, bool, datetime, datetime | None, float | None, int | None]
SILENT = "The model server does not answer its health check."
MAX_CHECKS_AT_ONCE = 16
# The states a backend is shown in (Backend.fleet_state): an unreachable one is `down`.
SHOWN_STATES = [state for state in Backend.State if state != Backend.State.UNREACHABLE]


def _answers(url: str) -> bool:
    """Whether the model server at `url` answers `GET /health` within PROBE_TIMEOUT seconds."""
    config = TabbyConfig(
        base_url=url,
        api_key="",
        admin_key="",
        connect_timeout=min(settings.TABBY_CONNECT_TIMEOUT, PROBE_TIMEOUT),
        read_timeout=PROBE_TIMEOUT,
    )
    try:
        with TabbyClient(config) as client:
            client.health()
    except BackendError as exc:
        log.warning("The model server at %s does not answer its health check: %s", url, exc.message)
        return False
    return True


def health(backends: list[Backend]) -> dict[str, bool]:
    """Whether each backend's server answers its health check now, by name: all asked at once, so a
    scrape or a probe waits for the slowest one only (at most PROBE_TIMEOUT seconds)."""
    urls = {backend.name: settings.TABBY_HOST if backend.is_default else backend.base_url for backend in backends}
    if len(urls) == 1:
        return {name: _answers(url) for name, url in urls.items()}
    with ThreadPoolExecutor(max_workers=min(len(urls), MAX_CHECKS_AT_ONCE), thread_name_prefix="gantry-health") as pool:
        answers = {name: pool.submit(_answers, url) for name, url in urls.items()}
        return {name: future.result() for name, future in answers.items()}


def model_server_answers() -> dict[str, Any]:
    """/readyz's check of the model servers: ready when a backend in rotation answers its health check.
    Returns each backend's health and rotation (`backends`, for the body); raises NotReady else.

    A load balancer in front of Gantry asks whether this process can serve chat: with every server in
    rotation silent (or none in rotation), no answer can be given, whichever process is asked."""
    backends = fleet_backends()
    answering = health(backends)
    details = {
        "backends": {
            backend.name: {"health": "ok" if answering[backend.name] else SILENT, "in_rotation": backend.in_rotation}
            for backend in backends
        }
    }
    rotation = [backend.name for backend in backends if backend.in_rotation]
    if any(answering[name] for name in rotation):
        return details
    if not rotation:
        raise NotReady("No backend is in rotation: resume one in the Admin Dashboard's Backends tab.", details)
    if len(backends) == 1:
        raise NotReady("The model server (TabbyAPI) does not answer.", details)
    raise NotReady(f"None of the model servers in rotation answers ({', '.join(rotation)}).", details)


def fleet_backends() -> list[Backend]:
    """Every backend, the default first. Without the database (which its own check reports), the default
    alone, the server of TABBY_HOST, still asked: /readyz names what is gone, not more."""
    try:
        return fleet.backends()
    except DatabaseError:
        return [Backend(name=DEFAULT_BACKEND)]


class ModelFigures:
    """A prometheus_client collector (see gantry.metrics.add_collector)."""

    def collect(self) -> Iterator[Metric]:
        finished = Operation.objects.filter(kind=Operation.Kind.SWITCH).exclude(status=Operation.Status.RUNNING)
        rows: list[SwitchRow] = list(
            finished.order_by("id").values_list(
                "to_model", "from_model", "status", "rolled_back", "started", "finished", "load_seconds", "backend_id"
            )
        )
        yield from switch_figures(rows)
        backends = fleet_backends()
        yield from backend_figures(backends, health(backends))
        yield from backend_loads(backends, rows)


def switch_figures(rows: list[SwitchRow]) -> Iterator[Metric]:
    outcomes = Counter({Operation.Status.SUCCEEDED.value: 0, Operation.Status.FAILED.value: 0})
    durations: dict[tuple[str, ...], list[float]] = defaultdict(list)
    loads: dict[tuple[str, ...], list[tuple[datetime, float]]] = defaultdict(list)
    for to_model, from_model, status, rolled_back, started, finished, load_seconds, _ in rows:
        ended = finished or started  # every finished switch has its end time
        outcomes[status] += 1
        durations[(to_model, status)].append((ended - started).total_seconds())
        if (loaded := completed_load(to_model, from_model, status, rolled_back)) and load_seconds is not None:
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


def completed_load(to_model: str, from_model: str, status: str, rolled_back: bool) -> str:
    """The model a finished switch loaded: the target's when it succeeded, the previous model's when it
    was loaded again (a failed switch's load_seconds is then that reload's); "" for none."""
    return to_model if status == Operation.Status.SUCCEEDED else from_model if rolled_back else ""


def backend_figures(backends: list[Backend], answering: dict[str, bool]) -> Iterator[Metric]:
    """Each backend's health, state, model, rotation and running answers, labelled by backend."""
    up = GaugeMetricFamily(
        "gantry_backend_up", "1 when the backend's model server answers its health check now, else 0.", labels=["backend"]
    )
    state = GaugeMetricFamily(
        "gantry_backend_state", "1 for the backend's current state, 0 for the others.", labels=["backend", "state"]
    )
    active = GaugeMetricFamily(
        "gantry_backend_active_model",
        "1 for the model the backend serves (none while switching or unloaded).",
        labels=["backend", "model"],
    )
    rotation = GaugeMetricFamily(
        "gantry_backend_in_rotation", "1 when new answers may go to the backend, 0 while it is drained.", labels=["backend"]
    )
    running = GaugeMetricFamily(
        "gantry_backend_generations_running", "Answers the backend is generating now, by every process.", labels=["backend"]
    )
    for backend in backends:
        up.add_metric([backend.name], 1.0 if answering.get(backend.name) else 0.0)
        shown = backend.fleet_state
        for choice in SHOWN_STATES:
            state.add_metric([backend.name, choice.value], 1.0 if shown == choice else 0.0)
        if backend.is_ready:
            active.add_metric([backend.name, backend.active_model], 1.0)
        rotation.add_metric([backend.name], 1.0 if backend.in_rotation else 0.0)
        running.add_metric([backend.name], float(running_answers(backend.pk)))
    yield from (up, state, active, rotation, running)


def backend_loads(backends: list[Backend], rows: list[SwitchRow]) -> Iterator[Metric]:
    """Each backend's latest completed load: how long it took, and when it ended (`rows` oldest first)."""
    latest: dict[int, tuple[str, float, datetime]] = {}
    for to_model, from_model, status, rolled_back, started, finished, load_seconds, backend_id in rows:
        if (
            backend_id is not None
            and load_seconds is not None
            and (loaded := completed_load(to_model, from_model, status, rolled_back))
        ):
            latest[backend_id] = (loaded, load_seconds, finished or started)
    seconds = GaugeMetricFamily(
        "gantry_backend_last_load_seconds",
        "How long the backend's latest completed load took, with the model it loaded.",
        labels=["backend", "model"],
    )
    ended = GaugeMetricFamily(
        "gantry_backend_last_load_timestamp_seconds",
        "When the backend's latest completed load ended (Unix time).",
        labels=["backend", "model"],
    )
    for backend in backends:
        if backend.pk in latest:
            model, took, when = latest[backend.pk]
            seconds.add_metric([backend.name, model], took)
            ended.add_metric([backend.name, model], when.timestamp())
    yield seconds
    yield ended
