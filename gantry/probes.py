"""Operations endpoints: `/healthz` (the process lives), `/readyz` (what it needs answers: the
database, the channel layer, and a model server in rotation, each backend's health in the body) and `/metrics`.

Probes and Prometheus address a process by its container name or IP address and talk plain HTTP inside
the network, so `ProbesMiddleware` (gantry.middleware) answers the probes, and `/metrics` asked with a
token, before the host check and the HTTPS redirect. `/metrics` asked with an admin's session goes
through the whole stack like any page.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from channels.layers import get_channel_layer
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from prometheus_client import CollectorRegistry
from prometheus_client.django import PrometheusDjangoView

from gantry import metrics
from gantry.background import spawn

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0  # seconds a readiness check may take before it counts as failed


class NotReady(Exception):
    """A readiness check failed; the message is the sentence /readyz shows, `details` more of the body
    (as a passing check returns them)."""

    def __init__(self, sentence: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(sentence)
        self.details = dict(details or {})


# A check raises NotReady with a sentence, or passes; either way it may add details to the body.
Check = Callable[[], Mapping[str, Any] | None]


# Readiness checks


def database() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # any driver's failure means the same thing here
        log.warning("Readiness: the database does not answer: %s", exc)
        raise NotReady("The database does not answer.") from exc


async def _channel_layer_round_trip() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise NotReady("No channel layer is configured.")
    # The channel exists before the send: Redis's publish/subscribe layer delivers only to listeners.
    channel = await layer.new_channel("readyz.")
    await layer.send(channel, {"type": "readyz"})
    await layer.receive(channel)


def channel_layer() -> None:
    """A message sent through the channel layer comes back (Redis in production), on the loop that
    owns the layer's connections."""
    try:
        spawn(asyncio.wait_for(_channel_layer_round_trip(), PROBE_TIMEOUT)).result(timeout=PROBE_TIMEOUT + 1)
    except NotReady:
        raise
    except Exception as exc:  # a timeout, a refused connection, a broken layer: all mean the same here
        log.warning("Readiness: the channel layer does not answer: %r", exc)
        raise NotReady("The channel layer (Redis) does not answer.") from exc


CHECKS: dict[str, Check] = {"database": database, "channel_layer": channel_layer}


def add_check(name: str, check: Check) -> None:
    """Make `check` (raising NotReady with a sentence) part of /readyz; what it returns (or its NotReady's
    `details`) goes into the body beside `checks`."""
    CHECKS[name] = check


# Views


def healthz(request: HttpRequest) -> HttpResponse:
    """The process lives and serves requests; nothing else is asked."""
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> HttpResponse:
    """200 when every check passes; else 503 naming the ones that failed, each with its sentence."""
    results: dict[str, str] = {}
    details: dict[str, Any] = {}
    for name, check in CHECKS.items():
        try:
            details.update(check() or {})
        except NotReady as exc:
            results[name] = str(exc)
            details.update(exc.details)
        else:
            results[name] = "ok"
    failed = [name for name, result in results.items() if result != "ok"]
    if not failed:
        return JsonResponse({"status": "ready", "checks": results, **details})
    detail = " ".join(results[name] for name in failed)
    return JsonResponse({"status": "not ready", "detail": detail, "failed": failed, "checks": results, **details}, status=503)


@functools.cache
def served() -> CollectorRegistry:
    """What /metrics serves (made on first use, after the apps added their collectors)."""
    return metrics.registry()


class MetricsView(PrometheusDjangoView):  # type: ignore[misc]
    """prometheus_client's view (content negotiation, compression), for an admin's session or
    GANTRY_METRICS_TOKEN."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        refusal = metrics_refusal(request)
        if refusal is not None:
            return refusal
        self.registry = served()
        return super().dispatch(request, *args, **kwargs)


def metrics_refusal(request: HttpRequest) -> HttpResponse | None:
    if metrics.is_bearer(request.headers.get("Authorization")):
        refusal = metrics.token_refusal(request.headers["Authorization"])
        return None if refusal is None else _refused(refusal, 401)
    user = request.user
    if not user.is_authenticated:
        return _refused("Log in as an admin (or send Authorization: Bearer <GANTRY_METRICS_TOKEN>) to read the metrics.", 401)
    if not user.is_staff:
        return _refused("Only admins can read the metrics.", 403)
    return None


def _refused(detail: str, status: int) -> HttpResponse:
    response = JsonResponse({"detail": detail}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = "Bearer"
    return response


metrics_view = MetricsView.as_view()
EARLY: dict[str, Callable[[HttpRequest], HttpResponseBase]] = {"/healthz": healthz, "/readyz": readyz}


def early_response(request: HttpRequest) -> HttpResponseBase | None:
    """The answer to a probe, or to a request for the metrics with a token, before the rest of the stack."""
    view = EARLY.get(request.path_info)
    if view is not None:
        return view(request)
    if request.path_info == "/metrics" and metrics.is_bearer(request.headers.get("Authorization")):
        return metrics_view(request)
    return None
