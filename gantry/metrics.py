"""Gantry's Prometheus metrics, through prometheus_client (README, "Metrics and health").

Two kinds of figure:
- Events, counted by the process they happen in (an answer's first token, a held message's release, a
  wrong password, a socket opening): the prometheus_client metrics below, observed once per event,
  never per token. With PROMETHEUS_MULTIPROC_DIR, every process sharing that directory writes them
  there and any of them serves their sum (prometheus_client's multiprocess mode); without it each
  process serves its own, and Prometheus scrapes every process.
- State, read when scraped from the database (or asked of the model server): the apps' collectors,
  added with `add_collector`. Every process serves the same figures, exact however many processes
  made them: dashboards take one (`max`) rather than adding them up.

Web processes serve both at `/metrics` (gantry.probes); Celery processes serve their events with
`start_exporter` on GANTRY_METRICS_PORT.
"""

from __future__ import annotations

import atexit
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from django.conf import settings
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# `_created` series are not kept in multiprocess mode: without them, both modes serve the same names.
disable_created_metrics()

# This process's events (in multiprocess mode their values live in files; this registry is then unused).
EVENTS = CollectorRegistry()
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    EVENTS.register(_collector)

HOLD_SECONDS = Histogram(
    "gantry_hold_seconds",
    "Time a held message waited in the queue, from the moment it was queued to its release.",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=EVENTS,
)
FIRST_TOKEN_SECONDS = Histogram(
    "gantry_generation_first_token_seconds",
    "Time from an answer's request to TabbyAPI to its first token, by model.",
    ["model"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    registry=EVENTS,
)
TOKENS_PER_SECOND = Histogram(
    "gantry_generation_tokens_per_second",
    "An answer's decoding speed: the tokens after the first, over the time from the first to the last, by model.",
    ["model"],
    buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000),
    registry=EVENTS,
)
LOGIN_FAILURES = Counter("gantry_login_failures", "Logins refused for a wrong username or password.", registry=EVENTS)
# Summed over the live processes in multiprocess mode; a process's share goes when it exits.
WEBSOCKETS = Gauge(
    "gantry_websocket_connections", "Open WebSockets, by page.", ["page"], multiprocess_mode="livesum", registry=EVENTS
)


# State figures


_collectors: list[Collector] = []


def add_collector(collector: Collector) -> None:
    """Serve `collector`'s figures (read at scrape time) at every web process's /metrics."""
    _collectors.append(collector)


class _State:
    def collect(self) -> Iterator[Metric]:
        for collector in _collectors:
            try:
                yield from collector.collect()
            except Exception:  # a source that cannot be read must not hide every other figure
                log.exception("Metrics from %s could not be read", type(collector).__name__)


def histogram(
    name: str,
    documentation: str,
    labels: Sequence[str],
    observations: Mapping[tuple[str, ...], Iterable[float]],
    buckets: Sequence[float],
) -> HistogramMetricFamily:
    """A histogram of values known all at once (rows of the database), in prometheus_client's shape."""
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for key, found in sorted(observations.items()):
        values = sorted(found)
        counts = [(floatToGoString(bound), float(sum(1 for value in values if value <= bound))) for bound in buckets]
        family.add_metric(list(key), [*counts, ("+Inf", float(len(values)))], sum_value=sum(values))
    return family


def registry(state: bool = True) -> CollectorRegistry:
    """What a scrape of this process serves: the events (of every process sharing
    PROMETHEUS_MULTIPROC_DIR, or this process's own), and with `state` the state figures."""
    served = CollectorRegistry()
    if settings.PROMETHEUS_MULTIPROC_DIR:
        MultiProcessCollector(served, path=settings.PROMETHEUS_MULTIPROC_DIR)
    else:
        served.register(EVENTS)
    if state:
        served.register(_State())
    return served


def _forget_this_process() -> None:
    # The live gauges (open sockets) of an exited process must not count any more.
    if settings.configured and settings.PROMETHEUS_MULTIPROC_DIR:
        mark_process_dead(os.getpid(), settings.PROMETHEUS_MULTIPROC_DIR)


atexit.register(_forget_this_process)


# Access


def is_bearer(header: str | None) -> bool:
    """Whether an Authorization header offers a bearer token (other schemes, such as a proxy's Basic, are
    not a request for token access)."""
    return (header or "").lower().startswith("bearer ")


def bearer_matches(header: str | None) -> bool:
    """Whether an Authorization header carries GANTRY_METRICS_TOKEN (compared in constant time); never
    when the token is empty."""
    token = settings.GANTRY_METRICS_TOKEN
    scheme, _, given = (header or "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


NO_TOKEN = "Send Authorization: Bearer <GANTRY_METRICS_TOKEN> to read the metrics."
TOKEN_ACCESS_OFF = "Token access to the metrics is off: set GANTRY_METRICS_TOKEN."


def token_refusal(header: str | None) -> str | None:
    """Why a request for the metrics by token is refused (None: it is not)."""
    if bearer_matches(header):
        return None
    return NO_TOKEN if settings.GANTRY_METRICS_TOKEN else TOKEN_ACCESS_OFF


# Celery processes


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the worker's log


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def exporter_app() -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """`/healthz` (the process lives) for anyone, and `/metrics` (this machine's events) for the token."""
    metrics = make_wsgi_app(registry(state=False))

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "ok"})
        if path != "/metrics":
            return _json(start_response, "404 Not Found", {"detail": "Only /metrics and /healthz are served here."})
        refusal = token_refusal(environ.get("HTTP_AUTHORIZATION"))
        if refusal is not None:
            return _json(start_response, "401 Unauthorized", {"detail": refusal}, [("WWW-Authenticate", "Bearer")])
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


def _json(
    start_response: StartResponse, status: str, body: dict[str, str], headers: Sequence[tuple[str, str]] = ()
) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json"), *headers])
    return [json.dumps(body).encode()]


def start_exporter(port: int) -> WSGIServer | None:
    """Serve `exporter_app` on `port` (all addresses) from a daemon thread; 0: nothing."""
    if not port:
        return None
    server = make_server("0.0.0.0", port, exporter_app(), ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-exporter", daemon=True).start()
    log.info("Metrics served on port %d (/metrics, /healthz)", port)
    return server
