"""Balancing: the chat's throughput with two backends holding the same model (one CPU thread each) against
one of them alone (the other drained), 8 conversations asking at once, measured in one run.

Measured twice, with two bounds of answers at once per backend (GANTRY_MAX_CONCURRENT_GENERATIONS):
- the default, 8: one backend alone takes all eight chats in one batch, and its batching (the model
  server's forward passes shared by the answers in flight) already gets most of what a second core could
  add; what a second backend adds is what four rows a batch gain over eight;
- 4, a backend's bound set below the crowd (as a GPU's memory for its caches sets it): one backend alone
  answers four and holds the other four, two answer all eight.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path

import httpx
import websockets

from bench.common import median, report
from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import ADMIN_KEY, API_KEY, DEMO_MODELS, run_tabby, wait_loaded

MODEL = "Small-Chat-200M"
SERVER = {"model": {"model_name": MODEL}, "developer": {"cpu_threads": 1}}
CHATS = 8
ROUNDS = 3  # messages each conversation sends, one after the other's answer
REPEATS = 2
BOUNDS = (CHATS, CHATS // 2)  # answers at once per backend: the default, then below the crowd
QUESTION = "Tell me about the sea."


async def conversation(site: Site, member: httpx.AsyncClient, cookie: str) -> int:
    """Ask ROUNDS questions, each once the previous answer is done; the pieces streamed in all."""
    created = (await member.post(site.url + "/api/conversations/", json={})).json()
    url = site.url.replace("http://", "ws://") + f"/ws/chat/{created['id']}/"
    pieces = 0
    async with websockets.connect(url, additional_headers={"Cookie": cookie, "Origin": site.url}) as socket:
        for _ in range(ROUNDS):
            posted = await member.post(site.url + f"/api/conversations/{created['id']}/messages/", json={"content": QUESTION})
            assert posted.status_code == 202, posted.text
            while True:
                event = json.loads(await socket.recv())
                if event["type"] == "chat.token":
                    pieces += 1
                elif event["type"] == "chat.message" and event["message"]["id"] == posted.json()["id"] and event["message"]["status"] in ("done", "failed"):
                    assert event["message"]["status"] == "done", event
                    break
    return pieces


async def throughput(site: Site, member: httpx.AsyncClient, cookie: str) -> float:
    """Pieces streamed per second by CHATS conversations asking at once."""
    started = time.perf_counter()
    pieces = await asyncio.gather(*(conversation(site, member, cookie) for _ in range(CHATS)))
    return sum(pieces) / (time.perf_counter() - started)


async def measure(site: Site, second_url: str, bound: int) -> None:
    async with httpx.AsyncClient(timeout=300) as member, httpx.AsyncClient(timeout=300) as admin:
        await member.post(site.url + "/api/auth/login", json={"username": MEMBER[0], "password": MEMBER[1]})
        await admin.post(site.url + "/api/auth/login", json={"username": ADMIN[0], "password": ADMIN[1]})
        added = await admin.post(site.url + "/api/admin/backends", json={"name": "second", "url": second_url, "api_key": API_KEY, "admin_key": ADMIN_KEY})
        assert added.status_code == 201, added.text
        cookie = f"session_id={member.cookies['session_id']}"
        await throughput(site, member, cookie)  # warms up both servers and the site
        ones, twos = [], []
        for _ in range(REPEATS):  # alternated, so that a change of the machine's load weighs on both
            await admin.post(site.url + "/api/admin/backends/second/drain")
            ones.append(await throughput(site, member, cookie))
            await admin.post(site.url + "/api/admin/backends/second/resume")
            twos.append(await throughput(site, member, cookie))
    one, two = median(ones), median(twos)
    print(f"{CHATS} conversations asking at once, {ROUNDS} questions each, {MODEL} on one CPU thread per server, at most")
    print(f"{bound} answers at once per backend{' (the default)' if bound == CHATS else ''}; median of {REPEATS} alternated runs;")
    print(f"answers per backend: {answers_by_backend(site)}")
    report("throughput, one backend (the other drained)", one, "pieces/s")
    report("throughput, two backends", two, "pieces/s", one, ">= 1.6x one backend's")


def answers_by_backend(site: Site) -> dict[str, int]:
    with closing(sqlite3.connect(f"file:{site.workdir / 'gantry.sqlite3'}?mode=ro", uri=True, timeout=20)) as db:
        rows = db.execute(
            "SELECT b.name, COUNT(*) FROM chat_message m JOIN models_admin_backend b ON b.id = m.backend_id"
            " WHERE m.role = 'assistant' GROUP BY b.name"
        ).fetchall()
    return {str(name): int(count) for name, count in rows}


def main() -> None:
    with (
        tempfile.TemporaryDirectory() as workdir,
        run_tabby(Path(workdir) / "first", DEMO_MODELS, config=SERVER) as first,
        run_tabby(Path(workdir) / "second", DEMO_MODELS, config=SERVER) as second,
    ):
        wait_loaded(first, MODEL)
        wait_loaded(second, MODEL)
        for bound in BOUNDS:
            env = {"GANTRY_MAX_ANSWER_TOKENS": "48", "GANTRY_MAX_CONCURRENT_GENERATIONS": str(bound)}
            with run_site(Path(workdir) / f"site-{bound}", first.url, extra_env=env) as site:
                asyncio.run(measure(site, second.url, bound))


if __name__ == "__main__":
    main()
