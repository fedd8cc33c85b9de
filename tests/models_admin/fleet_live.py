"""A fleet of two real model servers on loopback behind a real site, for the fleet's tests (embedded and
production): the servers, reading the Backends API and the answers, and the failover scenario."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from harness.site import ADMIN, MEMBER, Site, receive_until
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


@contextmanager
def started_pair(
    root: Path, demo_models: Path, config: dict[str, Any] = TINY_SERVER, second: dict[str, Any] | None = None, second_model: str = TINY
) -> Iterator[Pair]:
    """Two servers started with `config` (the second with `second` if given), the first holding the tiny
    model, the second `second_model`; stopped at the end."""
    servers = Pair(root, demo_models)
    try:
        wait_loaded(servers.first.start(config), TINY)
        wait_loaded(servers.second.start(second or config), second_model)
        yield servers
    finally:
        servers.first.stop()
        servers.second.stop()


def add_second(site: Site, url: str) -> None:
    """Register the server at `url` as the backend SECOND, and wait until both backends are ready."""
    with site.session(ADMIN) as admin:
        body = {"name": SECOND, "url": url, "api_key": API_KEY, "admin_key": ADMIN_KEY}
        added = admin.post("/api/admin/backends", json=body)
        assert added.status_code == 201, added.text
        wait_until(lambda: all(b["state"] == "ready" for b in listed(admin)), 30, "both backends ready")


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


# Failover


async def killed_mid_answer(site: Site, pair: Pair) -> None:
    """Kill -9 the server answering a message, mid-answer: the answer completes on the other backend, the
    killed one is `down` within 5 s, and once its server is up again (with no model) it gets its desired
    model back and answers again."""
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
                # Down within 5 s of the kill, whatever becomes of the answer (its events wait in the socket).
                await asyncio.to_thread(wait_until, lambda name=victim_name: by_name(admin)[name]["state"] == "down", 10, "the backend down")
                down_after = time.monotonic() - killed_at
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
        survivor = SECOND if victim_name == "default" else "default"
        answered = answered_by(site, [question["id"]])
        assert answered == {question["id"]: survivor}
        assert down_after < 5, down_after
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
