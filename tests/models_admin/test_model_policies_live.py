"""Model policies against the real model server and the real site: a model idle for its `idle_unload_after`
is unloaded on time (never while an answer runs, never when pinned), audited with the source `policy`, and
messages sent afterwards are held as with any unloaded model; a `preload` model is loaded when the site
starts on a model server holding nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, start_daphne, stop
from harness.site import run_site as start_site
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.models_admin.live import backend, loaded_model, query, started_together, wait_until

TINY = "Tiny-Chat-5M"
SERVER = {"model": {"model_name": TINY}, "developer": {"cpu_threads": 1}}
# Long answers possible (one must outlast the idle time); refreshes every second (a short doubt at start).
ENV = {"GANTRY_MAX_ANSWER_TOKENS": "1500", "GANTRY_REFRESH_INTERVAL": "1"}
SETTINGS = f"/api/admin/models/{TINY}/settings"
ENDED = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def servers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TabbyServer, Site]]:
    port = free_port()
    with started_together(
        run_tabby(tmp_path_factory.mktemp("tabby"), demo_models, config=SERVER, port=port),
        start_site(tmp_path_factory.mktemp("site"), f"http://127.0.0.1:{port}", extra_env=ENV),
    ) as (tabby, site):
        wait_loaded(tabby, TINY)
        yield tabby, site


def policy_operations(site: Site) -> list[dict[str, Any]]:
    return query(
        site,
        "SELECT id, kind, status, source, from_model, to_model, requested_by_id, started, finished "
        "FROM models_admin_operation WHERE source = 'policy' ORDER BY id",
    )


def moment(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def used_at(site: Site) -> float:
    row = query(site, "SELECT used_at FROM models_admin_backend WHERE name = 'default'")[0]
    return moment(row["used_at"])


def loaded_again(site: Site) -> None:
    with site.session(ADMIN) as admin:
        assert admin.put(SETTINGS, json={}).status_code == 200  # no policy while the model is loaded again
        wait_until(lambda: backend(site)["operation_id"] is None, 60, "the running operation's end")
        if (backend(site)["state"], backend(site)["active_model"]) != ("ready", TINY):
            switched = admin.post("/api/admin/models/switch", json={"model_id": TINY}, timeout=120)
            assert switched.status_code == 200, switched.text


def answer(member: httpx.Client, content: str, timeout: float = 120) -> tuple[str, float]:
    """Ask in a new conversation; return the answer's status and how long it was seen generating."""
    conversation = member.post("/api/conversations/", json={}).json()["id"]
    posted = member.post(f"/api/conversations/{conversation}/messages/", json={"content": content})
    assert posted.status_code == 202, posted.text
    began = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = member.get(f"/api/conversations/{conversation}/messages/").json()
        question = next(m for m in messages if m["id"] == posted.json()["id"])
        if question["status"] == "generating" and began is None:
            began = time.monotonic()
        if question["status"] in ENDED:
            return question["status"], time.monotonic() - (began or time.monotonic())
        time.sleep(0.05)
    raise AssertionError(f"No answer within {timeout:g} s")


def test_an_idle_model_is_unloaded_on_time_and_never_while_an_answer_runs(servers: tuple[TabbyServer, Site]) -> None:
    tabby, site = servers
    loaded_again(site)
    before = len(policy_operations(site))
    with site.session(ADMIN) as admin, site.session(MEMBER) as member:
        assert admin.put(SETTINGS, json={"idle_unload_after": 2, "max_tokens": 1500}).status_code == 200
        # The tiny model sometimes ends an answer early: ask until one runs longer than the idle time.
        for _ in range(5):
            status, ran = answer(member, "Tell me a long story about a dragon and a king.")
            assert status == "done"
            if ran >= 3:
                break
            loaded_again(site)
            assert admin.put(SETTINGS, json={"idle_unload_after": 2, "max_tokens": 1500}).status_code == 200
        else:
            pytest.fail("The tiny model ended each of 5 answers within 3 s: none outlasted the idle time")
        ended = used_at(site)
        unloads = wait_until(lambda: policy_operations(site)[before:], 15, "the idle unload")
        unload = unloads[0]
        assert len(unloads) == 1 and unload["kind"] == "unload" and unload["from_model"] == TINY
        assert unload["requested_by_id"] is None  # Gantry itself, by the policy
        # About 2 s after the answer ended (the watchers look every second), not while it ran.
        assert 2.0 <= moment(unload["started"]) - ended <= 4.5, (unload, ended)
        wait_until(lambda: policy_operations(site)[before]["status"] == "succeeded", 30, "the unload's end")
        assert loaded_model(tabby) is None and backend(site)["state"] == "unloaded"

        listed = {row["id"]: row for row in admin.get("/api/admin/models").json()["models"]}
        assert listed[TINY]["active"] is False and listed[TINY]["idle_unload_in"] is None
        activity = admin.get("/admin/activity/").text
        assert 'Gantry <span class="via">(idle for its idle_unload_after)</span>' in activity

        # A message sent now is held, as with any unloaded model, and answered once the model is back.
        conversation = member.post("/api/conversations/", json={}).json()["id"]
        held = member.post(f"/api/conversations/{conversation}/messages/", json={"content": "Hello?"})
        assert held.status_code == 202 and held.json()["status"] == "queued"
        time.sleep(1.5)
        assert member.get(f"/api/conversations/{conversation}/messages/").json()[0]["status"] == "queued"
        assert admin.put(SETTINGS, json={}).status_code == 200
        assert admin.post("/api/admin/models/switch", json={"model_id": TINY}, timeout=120).status_code == 200

        def answered() -> bool:
            return member.get(f"/api/conversations/{conversation}/messages/").json()[0]["status"] == "done"

        wait_until(answered, 60, "the held message's answer")


def test_a_pinned_model_is_never_unloaded_for_being_idle(servers: tuple[TabbyServer, Site]) -> None:
    tabby, site = servers
    loaded_again(site)
    before = len(policy_operations(site))
    with site.session(ADMIN) as admin, site.session(MEMBER) as member:
        assert admin.put(SETTINGS, json={"idle_unload_after": 1, "pinned": True, "max_tokens": 8}).status_code == 200
        assert answer(member, "Hi")[0] == "done"
        listed = {row["id"]: row for row in admin.get("/api/admin/models").json()["models"]}
        assert listed[TINY]["pinned"] is True and listed[TINY]["idle_unload_in"] is None
        time.sleep(4)
        assert policy_operations(site)[before:] == [] and loaded_model(tabby) == TINY

        # Unpinned, the same model goes within seconds: the pin was what kept it.
        assert admin.put(SETTINGS, json={"idle_unload_after": 1, "max_tokens": 8}).status_code == 200
        wait_until(lambda: loaded_model(tabby) is None, 15, "the unpinned model's idle unload")
        assert [op["kind"] for op in policy_operations(site)[before:]] == ["unload"]


def test_a_preload_model_is_loaded_when_the_site_starts_on_a_server_holding_nothing(servers: tuple[TabbyServer, Site]) -> None:
    tabby, site = servers
    loaded_again(site)
    before = len(policy_operations(site))
    with site.session(ADMIN) as admin:
        assert admin.post("/api/admin/models/unload", timeout=120).status_code == 200
        assert admin.put(SETTINGS, json={"preload": True}).status_code == 200
    assert loaded_model(tabby) is None
    # The site stops, and starts again on the same database with the model server holding nothing.
    for process in site.processes:
        stop(process)
    start_daphne(site, int(site.url.rsplit(":", 1)[1]), name="restarted")
    wait_until(lambda: loaded_model(tabby) == TINY, 60, "the preload")
    wait_until(lambda: backend(site)["state"] == "ready", 30, "the site to see it ready")
    operations = policy_operations(site)[before:]
    assert [(op["kind"], op["to_model"], op["status"]) for op in operations] == [("switch", TINY, "succeeded")]
    assert operations[0]["requested_by_id"] is None
    with site.session(ADMIN) as admin:
        assert 'Gantry <span class="via">(preload at start)</span>' in admin.get("/admin/activity/").text
    assert f"Preloading {TINY} on the backend default, which holds nothing" in (site.workdir / "restarted.log").read_text()
