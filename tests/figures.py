"""Reading Gantry's /metrics in tests, with prometheus_client's own parser."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "metrics-test-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}

# What the README promises (counters with their `_total`).
PROMISED = {
    "gantry_model_switches_total": "counter",
    "gantry_model_switch_duration_seconds": "histogram",
    "gantry_model_load_seconds": "histogram",
    "gantry_model_last_load_seconds": "gauge",
    "gantry_rollbacks_total": "counter",
    "gantry_queue_depth": "gauge",
    "gantry_hold_seconds": "histogram",
    "gantry_generations_running": "gauge",
    "gantry_generation_first_token_seconds": "histogram",
    "gantry_generation_tokens_per_second": "histogram",
    "gantry_backend_up": "gauge",
    "gantry_backend_state": "gauge",
    "gantry_backend_active_model": "gauge",
    "gantry_backend_in_rotation": "gauge",
    "gantry_backend_generations_running": "gauge",
    "gantry_backend_last_load_seconds": "gauge",
    "gantry_backend_last_load_timestamp_seconds": "gauge",
    "gantry_usage_requests_total": "counter",
    "gantry_usage_prompt_tokens_total": "counter",
    "gantry_usage_completion_tokens_total": "counter",
    "gantry_usage_hold_seconds_total": "counter",
    "gantry_usage_generation_seconds_total": "counter",
    "gantry_login_failures_total": "counter",
    "gantry_websocket_connections": "gauge",
}


class Figures:
    """One scrape: every sample by name and labels, and each family's type."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name + ("_total" if family.type == "counter" else "")] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when it is not there yet (a counter or histogram not observed yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self.samples if sample == name]


def scrape(client: httpx.Client | str, headers: dict[str, str] | None = None) -> Figures:
    """/metrics of a site (with a client holding a session, or a base URL and the token)."""
    if isinstance(client, str):
        response = httpx.get(client + "/metrics", headers=headers if headers is not None else BEARER, timeout=30)
    else:
        response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain"), response.headers
    return Figures(response.text)


def moved(before: Figures, after: Figures, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def timestamp(value: Any) -> datetime:
    """A datetime read from the site's database (SQLite gives text, PostgreSQL datetimes)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
