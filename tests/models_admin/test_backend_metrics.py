"""/metrics and /readyz describe every backend of a fleet: two real model servers on loopback behind one
real site. Each backend has its health, state, model, rotation, running answers and latest load, labelled
by name; the site is ready while a backend in rotation answers, and the body says how each one is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, receive_until, run_site
from tests.conftest import TINY, TINY_SERVER
from tests.figures import Figures, scrape, timestamp
from tests.models_admin.fleet_live import SECOND, Pair, add_second, started_pair
from tests.models_admin.live import query, wait_until

SMALL = "Small-Chat-200M"
BACKENDS = ("default", SECOND)
STATES = ("ready", "switching", "unloading", "unloaded", "failed", "draining", "down")
SILENT = "The model server does not answer its health check."
OK = {"database": "ok", "channel_layer": "ok", "model_server": "ok"}


@pytest.fixture(scope="module")
def pair(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with started_pair(tmp_path_factory.mktemp("fleet"), demo_models) as servers:
        yield servers


@pytest.fixture(scope="module")
def site(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(tmp_path_factory.mktemp("site"), pair.first.url) as site:
        add_second(site, pair.second.url)
        yield site


@pytest.fixture
def admin(site: Site) -> Iterator[httpx.Client]:
    with site.session(ADMIN) as client:
        yield client


def states(figures: Figures, backend: str) -> dict[str, float]:
    return {state: figures.get("gantry_backend_state", backend=backend, state=state) for state in STATES}


def shown_in(state: str) -> dict[str, float]:
    return {name: 1.0 if name == state else 0.0 for name in STATES}


def down(admin: httpx.Client, backend: str) -> Figures | None:
    """A scrape showing `backend` down (None: not yet)."""
    figures = scrape(admin)
    return figures if states(figures, backend)["down"] else None


def readyz(site: Site) -> httpx.Response:
    return httpx.get(site.url + "/readyz", timeout=30)


def test_every_backend_has_its_own_series(admin: httpx.Client) -> None:
    figures = scrape(admin)

    for name in ("gantry_backend_up", "gantry_backend_in_rotation", "gantry_backend_generations_running"):
        assert sorted(labels["backend"] for labels in figures.labels_of(name)) == sorted(BACKENDS), name
    for backend in BACKENDS:
        assert figures.get("gantry_backend_up", backend=backend) == 1
        assert states(figures, backend) == shown_in("ready")
        assert figures.get("gantry_backend_in_rotation", backend=backend) == 1
        assert figures.get("gantry_backend_generations_running", backend=backend) == 0
    assert sorted(map(dict.items, figures.labels_of("gantry_backend_active_model"))) == sorted(
        map(dict.items, [{"backend": backend, "model": TINY} for backend in BACKENDS])
    )
    assert figures.types["gantry_backend_generations_running"] == "gauge"


async def test_a_running_answer_counts_for_the_backend_giving_it(site: Site, admin: httpx.Client) -> None:
    with site.session(MEMBER) as member:
        conversation = member.post("/api/conversations/", json={}).json()["id"]
        async with site.socket(f"/ws/chat/{conversation}/", member) as chat:
            question = member.post(f"/api/conversations/{conversation}/messages/", json={"content": "Write a long story."}).json()
            await receive_until(chat, lambda event: event["type"] == "chat.token")
            during = scrape(admin)
            stopped = member.post(f"/api/messages/{question['id']}/stop/")
            await receive_until(chat, lambda event: event["type"] == "chat.done")
    answering = query(
        site,
        "SELECT b.name FROM chat_message m JOIN models_admin_backend b ON b.id = m.backend_id WHERE m.id = ?",
        question["id"],
    )
    other = next(name for name in BACKENDS if name != answering[0]["name"])

    assert stopped.json()["status"] == "cancelled"  # it was still running when it was counted
    assert during.get("gantry_backend_generations_running", backend=answering[0]["name"]) == 1
    assert during.get("gantry_backend_generations_running", backend=other) == 0
    assert during.get("gantry_generations_running") == 1  # the whole fleet's, as before


def latest_load(site: Site, backend: str) -> dict[str, Any]:
    rows = query(
        site,
        "SELECT o.to_model, o.load_seconds, o.finished FROM models_admin_operation o"
        " JOIN models_admin_backend b ON b.id = o.backend_id WHERE b.name = ? AND o.status = 'succeeded' ORDER BY o.id DESC LIMIT 1",
        backend,
    )
    return rows[0]


def test_a_switch_of_one_backend_is_its_latest_load(site: Site, admin: httpx.Client) -> None:
    before = scrape(admin)
    switched = admin.post(f"/api/admin/backends/{SECOND}/switch", json={"model_id": SMALL}, timeout=180)
    assert switched.status_code == 200, switched.text
    after = scrape(admin)
    load = latest_load(site, SECOND)

    assert before.labels_of("gantry_backend_last_load_seconds") == []  # nothing loaded through Gantry yet
    assert load["to_model"] == SMALL
    assert after.labels_of("gantry_backend_last_load_seconds") == [{"backend": SECOND, "model": SMALL}]
    assert after.get("gantry_backend_last_load_seconds", backend=SECOND, model=SMALL) == pytest.approx(
        load["load_seconds"], abs=1e-3
    )
    ended = timestamp(load["finished"])
    assert after.get("gantry_backend_last_load_timestamp_seconds", backend=SECOND, model=SMALL) == pytest.approx(
        ended.timestamp(), abs=1e-3
    )
    assert after.get("gantry_backend_active_model", backend=SECOND, model=SMALL) == 1
    assert after.get("gantry_backend_active_model", backend="default", model=TINY) == 1
    assert after.get("gantry_model_last_load_seconds", model=SMALL) == pytest.approx(load["load_seconds"], abs=1e-3)

    back = admin.post(f"/api/admin/backends/{SECOND}/switch", json={"model_id": TINY}, timeout=180)
    assert back.status_code == 200, back.text
    assert scrape(admin).labels_of("gantry_backend_last_load_seconds") == [{"backend": SECOND, "model": TINY}]


def test_readyz_is_ready_while_a_backend_in_rotation_answers_and_names_each(site: Site, pair: Pair, admin: httpx.Client) -> None:
    ready = readyz(site)
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": OK,
        "backends": {backend: {"health": "ok", "in_rotation": True} for backend in BACKENDS},
    }

    pair.second.stop()
    try:
        one_silent = readyz(site)
        figures = wait_until(lambda: down(admin, SECOND), 15, "the stopped backend to be down")
        drained = admin.post("/api/admin/backends/default/drain")
        assert drained.status_code == 200, drained.text
        none_answering = readyz(site)
        drained_figures = scrape(admin)
        admin.post(f"/api/admin/backends/{SECOND}/drain")
        none_in_rotation = readyz(site)
    finally:
        admin.post("/api/admin/backends/default/resume")
        admin.post(f"/api/admin/backends/{SECOND}/resume")
        pair.second.start(TINY_SERVER)

    assert one_silent.status_code == 200
    assert one_silent.json()["backends"] == {
        "default": {"health": "ok", "in_rotation": True},
        SECOND: {"health": SILENT, "in_rotation": True},
    }
    assert figures.get("gantry_backend_up", backend=SECOND) == 0 and figures.get("gantry_backend_up", backend="default") == 1
    assert states(figures, SECOND) == shown_in("down")

    assert none_answering.status_code == 503
    detail = f"None of the model servers in rotation answers ({SECOND})."
    assert none_answering.json() == {
        "status": "not ready",
        "detail": detail,
        "failed": ["model_server"],
        "checks": {**OK, "model_server": detail},
        "backends": {"default": {"health": "ok", "in_rotation": False}, SECOND: {"health": SILENT, "in_rotation": True}},
    }
    assert drained_figures.get("gantry_backend_in_rotation", backend="default") == 0
    assert states(drained_figures, "default") == shown_in("draining")

    assert none_in_rotation.status_code == 503
    assert none_in_rotation.json()["detail"] == "No backend is in rotation: resume one in the Admin Dashboard's Backends tab."
    assert readyz(site).status_code == 200  # resumed: the default answers again
