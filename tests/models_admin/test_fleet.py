"""A fleet of two real model servers on loopback behind one real site: the Backends API, balancing,
drain and resume, and failover when one server is killed mid-answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, receive_until, run_site
from harness.tabby_server import ADMIN_KEY, API_KEY, wait_loaded
from tests.conftest import TINY, TINY_SERVER
from tests.models_admin.live import RestartableTabby, query, wait_until

SECOND = "gpu-2"
EMPTY_SERVER = {"developer": {"cpu_threads": 1}}  # a server that comes back with no model loaded


class Pair:
    """Two model servers holding the tiny model, each on a fixed port, stopped, killed and started again."""

    def __init__(self, root: Path, demo_models: Path) -> None:
        self.first = RestartableTabby(root / "first", demo_models)
        self.second = RestartableTabby(root / "second", demo_models)

    def by_url(self, url: str) -> RestartableTabby:
        return self.first if url == self.first.url else self.second


@pytest.fixture(scope="module")
def pair(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    servers = Pair(tmp_path_factory.mktemp("fleet"), demo_models)
    try:
        for server in (servers.first, servers.second):
            wait_loaded(server.start(TINY_SERVER), TINY)
        yield servers
    finally:
        servers.first.stop()
        servers.second.stop()


@pytest.fixture(scope="module")
def site(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(tmp_path_factory.mktemp("site"), pair.first.url) as site:
        with site.session(ADMIN) as admin:
            added = admin.post("/api/admin/backends", json={"name": SECOND, "url": pair.second.url, "api_key": API_KEY, "admin_key": ADMIN_KEY})
            assert added.status_code == 201, added.text
            wait_until(lambda: all(b["state"] == "ready" for b in listed(admin)), 30, "both backends ready")
        yield site


def listed(admin: httpx.Client) -> list[dict[str, Any]]:
    answer = admin.get("/api/admin/backends")
    assert answer.status_code == 200, answer.text
    return list(answer.json()["backends"])


def by_name(admin: httpx.Client) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in listed(admin)}


def ask(client: httpx.Client, content: str) -> tuple[int, int]:
    conversation = client.post("/api/conversations/", json={}).json()
    question = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": content})
    assert question.status_code in (201, 202), question.text
    return conversation["id"], question.json()["id"]


def answered_by(site: Site, question_ids: list[int], timeout: float = 60) -> dict[int, str]:
    """Wait until every question is answered; the name of the backend that answered each."""
    marks = ",".join("?" * len(question_ids))

    def done() -> list[dict[str, Any]] | None:
        rows = query(
            site,
            f"SELECT m.reply_to_id AS q, m.status, b.name FROM chat_message m LEFT JOIN models_admin_backend b ON b.id = m.backend_id"
            f" WHERE m.reply_to_id IN ({marks})",
            *question_ids,
        )
        return rows if len(rows) == len(question_ids) and all(r["status"] == "done" for r in rows) else None

    rows = wait_until(done, timeout, f"answers to {question_ids}")
    return {row["q"]: row["name"] for row in rows}


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
    with site.session(MEMBER) as member:
        assert member.get("/api/admin/backends").status_code == 403
        assert member.post("/api/admin/backends/gpu-2/drain").status_code == 403
    with httpx.Client(base_url=site.url) as anonymous:
        assert anonymous.get("/api/admin/backends").status_code == 401


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


# Failover


async def test_a_backend_killed_mid_answer_is_down_within_5_s_its_answer_completes_elsewhere_and_it_comes_back(
    site: Site, pair: Pair
) -> None:
    with site.session(MEMBER) as member, site.session(ADMIN) as admin:
        conversation = member.post("/api/conversations/", json={}).json()
        async with site.socket(f"/ws/chat/{conversation['id']}/", member) as socket:
            for _ in range(5):
                question = member.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Go on and on"}).json()
                events = await receive_until(socket, lambda e: e["type"] == "chat.token")
                rows = query(site, "SELECT b.name, b.base_url FROM chat_message m JOIN models_admin_backend b ON b.id = m.backend_id WHERE m.id = ?", question["id"])
                victim_name = rows[0]["name"]
                victim = pair.first if victim_name == "default" else pair.second
                assert victim.server is not None
                victim.server.process.kill()  # kill -9, in the middle of the answer
                killed_at = time.monotonic()
                victim.server.process.wait()
                victim.stop()
                asked = question["id"]
                events += await receive_until(socket, lambda e, asked=asked: e["type"] == "chat.message" and e["message"]["id"] == asked and e["message"]["status"] in ("done", "failed"), timeout=60)
                note = [e for e in events if e["type"] == "chat.message" and e["message"]["id"] == question["id"] and e["message"]["error"].startswith("Interrupted")]
                if note:
                    break
                # The answer was complete before the kill: bring the server back with its model, and ask again.
                await asyncio.to_thread(wait_loaded, victim.start(TINY_SERVER), TINY)
                await asyncio.to_thread(wait_until, lambda name=victim_name: by_name(admin)[name]["state"] == "ready", 30, "the server back")
            else:
                raise AssertionError("Every answer was complete before its server was killed.")
        down = await asyncio.to_thread(wait_until, lambda: by_name(admin)[victim_name]["state"] == "down", 10, "the backend down")
        down_after = time.monotonic() - killed_at
        survivor = SECOND if victim_name == "default" else "default"
        answered = answered_by(site, [question["id"]])
        assert answered == {question["id"]: survivor}
        assert down and down_after < 5, down_after
        assert by_name(admin)[victim_name]["healthy"] is False
        # Chat pages see the model ready: the other backend answers for it (no "Model server unreachable").
        async with site.socket("/ws/chat/", member) as page:
            (greeting,) = (await receive_until(page, lambda e: e["type"] == "model.state"))[-1:]
        assert (greeting["state"], greeting["active_model"], greeting["trouble"]) == ("ready", TINY, None)

        # Back up with nothing loaded: Gantry loads its desired model and puts it back in rotation.
        await asyncio.to_thread(victim.start, EMPTY_SERVER)
        up_at = time.monotonic()
        await asyncio.to_thread(
            wait_until, lambda: by_name(admin)[victim_name]["state"] == "ready" and by_name(admin)[victim_name]["active_model"] == TINY, 60, "the backend ready again"
        )
        rejoined_after = time.monotonic() - up_at
        loads = query(site, "SELECT source, status, to_model, load_seconds FROM models_admin_operation WHERE source = 'fleet' ORDER BY id DESC")
        assert loads and (loads[0]["status"], loads[0]["to_model"]) == ("succeeded", TINY)
        print(
            f"FIGURES fleet: down {down_after:.2f} s after kill -9; ready again {rejoined_after:.2f} s after its server was up,"
            f" of which the load itself took {loads[0]['load_seconds']:.2f} s"
        )
        # The load of a server that just started includes its engine's first import (on a shared CPU, from
        # seconds to over ten): Gantry's own part, noticing the server and starting and verifying the load, is bounded.
        assert rejoined_after - loads[0]["load_seconds"] < 5, (rejoined_after, loads[0]["load_seconds"])
        questions = [ask(member, f"After the return {i}")[1] for i in range(6)]
        assert set(answered_by(site, questions).values()) == {"default", SECOND}
