"""A fleet of two real model servers on loopback behind one real site: the Backends API, balancing,
drain and resume, and failover when one server is killed mid-answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, receive_until, run_site
from harness.tabby_server import ADMIN_KEY, API_KEY
from tests.conftest import TINY
from tests.models_admin.fleet_live import (
    SECOND,
    Pair,
    add_second,
    answered_by,
    ask,
    by_name,
    killed_mid_answer,
    started_pair,
)
from tests.models_admin.live import query


@pytest.fixture(scope="module")
def pair(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with started_pair(tmp_path_factory.mktemp("fleet"), demo_models) as servers:
        yield servers


@pytest.fixture(scope="module")
def site(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(tmp_path_factory.mktemp("site"), pair.first.url) as site:
        add_second(site, pair.second.url)
        yield site


# The API


def test_the_backends_api_lists_adds_edits_and_removes_backends_and_never_returns_keys(site: Site, pair: Pair) -> None:
    with site.session(ADMIN) as admin:
        rows = by_name(admin)
        assert set(rows) == {"default", SECOND}
        for row in rows.values():
            assert {"name", "url", "state", "active_model", "running", "healthy", "desired_model"} <= set(row)
            assert (row["state"], row["active_model"], row["desired_model"], row["healthy"]) == ("ready", TINY, TINY, True)
        assert rows[SECOND]["url"] == pair.second.url and rows["default"]["url"] == pair.first.url

        refusals = [
            ({"url": "http://127.0.0.1:1", "api_key": "a", "admin_key": "b"}, 400, "name"),
            ({"name": "Bad Name!", "url": "http://127.0.0.1:1", "api_key": "a", "admin_key": "b"}, 400, "name"),
            ({"name": "third", "url": "ftp://127.0.0.1:1", "api_key": "a", "admin_key": "b"}, 400, "http"),
            ({"name": "third", "url": "http://127.0.0.1:1", "admin_key": "b"}, 400, "api_key"),
            ({"name": SECOND, "url": "http://127.0.0.1:1", "api_key": "a", "admin_key": "b"}, 409, "already"),
            ({"name": "default", "url": "http://127.0.0.1:1", "api_key": "a", "admin_key": "b"}, 409, "already"),
        ]
        for body, status, word in refusals:
            answer = admin.post("/api/admin/backends", json=body)
            assert answer.status_code == status, (body, answer.text)
            assert word in answer.json()["detail"], answer.json()

        secret_api, secret_admin = "api-key-never-shown-7731", "admin-key-never-shown-9925"
        added = admin.post("/api/admin/backends", json={"name": "third", "url": "http://127.0.0.1:9", "api_key": secret_api, "admin_key": secret_admin})
        assert added.status_code == 201, added.text
        assert added.json()["backend"]["state"] == "down"  # nothing answers there: said, not refused
        edited = admin.patch("/api/admin/backends/third/", json={"api_key": "another-never-shown-5512"})
        assert edited.status_code == 200, edited.text
        assert admin.patch("/api/admin/backends/third/", json={"url": "gopher://x"}).status_code == 400
        assert admin.patch("/api/admin/backends/default/", json={"api_key": "x"}).status_code == 400
        shown = added.text + edited.text + admin.get("/api/admin/backends").text + admin.get("/api/admin/backends/third/").text
        for secret in (secret_api, secret_admin, "another-never-shown-5512", API_KEY, ADMIN_KEY):
            assert secret not in shown
        refused = admin.delete("/api/admin/backends/default/")
        assert refused.status_code == 409 and "TABBY_HOST" in refused.json()["detail"]
        tiny = [m for m in admin.get("/api/admin/models").json()["models"] if m["id"] == TINY]
        assert tiny and tiny[0]["active"] is True and tiny[0]["backends"] == ["default", SECOND]
        assert admin.delete("/api/admin/backends/third/").status_code == 200
        assert admin.delete("/api/admin/backends/third/").status_code == 404
        assert set(by_name(admin)) == {"default", SECOND}
        # A backend's switch and unload: the body is read first, then the backend is looked up.
        for action, body in (("switch", {"model_id": TINY}), ("unload", None)):
            gone = admin.post(f"/api/admin/backends/third/{action}", json=body)
            assert gone.status_code == 404 and "third" in gone.json()["detail"], gone.text
        assert admin.post(f"/api/admin/backends/{SECOND}/switch", json={}).status_code == 400
    with site.session(MEMBER) as member:
        assert member.get("/api/admin/backends").status_code == 403
        assert member.post("/api/admin/backends/gpu-2/drain").status_code == 403
        assert member.post(f"/api/admin/backends/{SECOND}/switch", json={"model_id": TINY}).status_code == 403
        assert member.post(f"/api/admin/backends/{SECOND}/unload").status_code == 403
    with httpx.Client(base_url=site.url) as anonymous:
        assert anonymous.get("/api/admin/backends").status_code == 401
        assert anonymous.post(f"/api/admin/backends/{SECOND}/switch", json={}).status_code == 401
        assert anonymous.post(f"/api/admin/backends/{SECOND}/unload").status_code == 401


# Balancing


def test_answers_are_spread_over_both_backends_and_each_answer_records_its_backend_and_model(site: Site) -> None:
    with site.session(MEMBER) as member:
        questions = [ask(member, f"Tell me a story number {i}")[1] for i in range(8)]
        answered = answered_by(site, questions)
    counts = {name: list(answered.values()).count(name) for name in ("default", SECOND)}
    assert set(answered.values()) <= {"default", SECOND}
    assert counts["default"] >= 2 and counts[SECOND] >= 2, counts
    models = query(site, f"SELECT model_name FROM chat_message WHERE reply_to_id IN ({','.join('?' * len(questions))})", *questions)
    assert {row["model_name"] for row in models} == {TINY}


def test_a_drained_backend_gets_no_new_answers_and_takes_them_again_once_resumed(site: Site) -> None:
    with site.session(ADMIN) as admin, site.session(MEMBER) as member:
        drained = admin.post(f"/api/admin/backends/{SECOND}/drain")
        assert drained.status_code == 200 and drained.json()["backend"]["state"] == "draining", drained.text
        questions = [ask(member, f"While drained {i}")[1] for i in range(4)]
        assert set(answered_by(site, questions).values()) == {"default"}
        resumed = admin.post(f"/api/admin/backends/{SECOND}/resume")
        assert resumed.status_code == 200 and resumed.json()["backend"]["state"] == "ready", resumed.text
        questions = [ask(member, f"Resumed {i}")[1] for i in range(6)]
        assert SECOND in answered_by(site, questions).values()


async def test_with_the_default_drained_the_other_backend_answers_and_chat_pages_show_the_model_ready(site: Site) -> None:
    with site.session(ADMIN) as admin, site.session(MEMBER) as member:
        assert admin.post("/api/admin/backends/default/drain").json()["backend"]["state"] == "draining"
        try:
            questions = [ask(member, f"Default drained {i}")[1] for i in range(4)]
            assert set(answered_by(site, questions).values()) == {SECOND}
            async with site.socket("/ws/chat/", member) as page:
                (greeting,) = (await receive_until(page, lambda e: e["type"] == "model.state"))[-1:]
            assert (greeting["state"], greeting["active_model"]) == ("ready", TINY)
        finally:
            assert admin.post("/api/admin/backends/default/resume").json()["backend"]["state"] == "ready"


# Failover


async def test_a_backend_killed_mid_answer_is_down_within_5_s_its_answer_completes_elsewhere_and_it_comes_back(
    site: Site, pair: Pair
) -> None:
    await killed_mid_answer(site, pair)
