"""Messages sent while no model can answer are held (`queued`) and answered once a model is ready:
in the order they came, within the queue's limit, unless their author cancels them, after an answer cut
off by an unload, and across restarts of the web process.

The model server is this module's own. It reads weights at 1 MB/s, so a switch to the 5 MB model stays
open about five seconds; its two folders are the same weights under two names. It cuts generations still
running half a second into an unload. Two sites share it: one with short answers, and one with long
answers (up to 1,900 tokens, a few seconds) and a one-second drain; both refresh every second. The test of
the queue's limit starts a third site, whose limit is 3.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.site import (
    ADMIN,
    MEMBER,
    OUTSIDER,
    BlockingConnection,
    Site,
    blocking_socket,
    receive_blocking,
    receive_until,
    run_site,
    start_daphne,
    stop,
)
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.models_admin.live import backend, query, started_together, wait_until

TINY = "Tiny-Chat-5M"
TINY_V2 = "Tiny-Chat-5M-v2"
SWITCHED_AWAY = "Interrupted by a model switch; it will be answered by the new model."
PROCESS_DIED = "Interrupted: the server answering it stopped. It will be answered again."
ENDED = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def servers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TabbyServer, Site, Site]]:
    folder = tmp_path_factory.mktemp("models")
    for name in (TINY, TINY_V2):
        (folder / name).symlink_to(demo_models / TINY, target_is_directory=True)
    config = {
        "model": {"model_name": TINY, "load_throttle_mbps": 1, "unload_timeout": 0.5},
        "developer": {"cpu_threads": 1},
    }
    short = {"GANTRY_MAX_ANSWER_TOKENS": "16", "GANTRY_REFRESH_INTERVAL": "1"}
    long = {"GANTRY_MAX_ANSWER_TOKENS": "1900", "GANTRY_DRAIN_TIMEOUT": "1", "GANTRY_REFRESH_INTERVAL": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with started_together(
        run_tabby(tmp_path_factory.mktemp("tabby"), folder, config=config, port=port, ready_timeout=120),
        run_site(tmp_path_factory.mktemp("site"), url, extra_env=short),
        run_site(tmp_path_factory.mktemp("long-site"), url, extra_env=long),
    ) as (tabby, site, long_site):
        wait_loaded(tabby, TINY)
        yield tabby, site, long_site


@pytest.fixture(scope="module")
def model_server(servers: tuple[TabbyServer, Site, Site]) -> TabbyServer:
    return servers[0]


@pytest.fixture(scope="module")
def site(servers: tuple[TabbyServer, Site, Site]) -> Site:
    return servers[1]


@pytest.fixture(scope="module")
def long_site(servers: tuple[TabbyServer, Site, Site]) -> Site:
    return servers[2]


# What the tests do and read


def switch(site: Site, model: str) -> httpx.Response:
    with site.session(ADMIN) as admin:
        return admin.post("/api/admin/models/switch", json={"model_id": model}, timeout=120)


def unload(site: Site) -> httpx.Response:
    with site.session(ADMIN) as admin:
        return admin.post("/api/admin/models/unload", timeout=120)


def make_active(site: Site, model: str | None) -> None:
    """Start from `model` loaded (or nothing), as this site knows it (another site may have changed it)."""
    with site.session(ADMIN) as admin:
        assert admin.post("/api/admin/models/refresh").status_code == 200
    response = switch(site, model) if model else unload(site)
    assert response.status_code == 200, response.text


@contextmanager
def in_background(call: Callable[..., httpx.Response], *args: Any) -> Iterator[Future[httpx.Response]]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(call, *args)


def post(client: httpx.Client, conversation_id: int, content: str) -> httpx.Response:
    return client.post(f"/api/conversations/{conversation_id}/messages/", json={"content": content})


def rows(site: Site, question_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The questions' rows by id, each with its answer's row (or None) under `answer`."""
    marks = ",".join("?" * len(question_ids))
    columns = "id, conversation_id, role, content, status, error, reply_to_id, model_name, created"
    found = query(
        site,
        f"SELECT {columns} FROM chat_message WHERE id IN ({marks}) OR reply_to_id IN ({marks})",
        *question_ids,
        *question_ids,
    )
    questions = {row["id"]: {**row, "answer": None} for row in found if row["role"] == "user"}
    for row in found:
        if row["role"] == "assistant":
            assert questions[row["reply_to_id"]]["answer"] is None, f"two answers to {row['reply_to_id']}"
            questions[row["reply_to_id"]]["answer"] = row
    return questions


def answered(site: Site, question_ids: list[int], timeout: float = 90) -> dict[int, dict[str, Any]]:
    """Wait until every question is done or stopped; return their rows."""

    def check() -> dict[int, dict[str, Any]] | None:
        found = rows(site, question_ids)
        return found if all(q["status"] in ENDED for q in found.values()) else None

    found = wait_until(check, timeout, f"answers to messages {question_ids}")
    assert found is not None
    return found


def answer_order(site: Site, question_ids: list[int]) -> list[int]:
    """The questions, in the order their answers were started (the answers' creation)."""
    marks = ",".join("?" * len(question_ids))
    found = query(
        site, f"SELECT reply_to_id FROM chat_message WHERE reply_to_id IN ({marks}) ORDER BY created, id", *question_ids
    )
    return [row["reply_to_id"] for row in found]


def port_of(site: Site) -> int:
    return int(site.url.rsplit(":", 1)[1])


def web_process(site: Site) -> Any:
    running = [p for p in site.processes if p.poll() is None]
    assert len(running) == 1, running
    return running[0]


def chat_socket(site: Site, client: httpx.Client, conversation_id: int) -> AbstractContextManager[BlockingConnection]:
    return blocking_socket(site.url, f"/ws/chat/{conversation_id}/", client.cookies["session_id"], 20)


def is_token(event: dict[str, Any]) -> bool:
    return event["type"] == "chat.token"


def token_or(last: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    return lambda e: is_token(e) or last(e)


def state_of(question_id: int, *states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == "chat.message" and e["message"]["id"] == question_id and e["message"]["status"] in states


# The tests


async def test_messages_sent_during_a_switch_are_held_and_answered_in_the_order_they_came(site: Site) -> None:
    await asyncio.to_thread(make_active, site, TINY)
    with site.session(MEMBER) as member:
        conversations = [member.post("/api/conversations/", json={}).json()["id"] for _ in range(5)]
        arrival = [conversations[i] for i in (2, 0, 4, 1, 3)]  # not the conversations' own order
        async with AsyncExitStack() as stack:
            sockets = {c: await stack.enter_async_context(site.socket(f"/ws/chat/{c}/", member)) for c in arrival}
            watcher = sockets[arrival[0]]
            with in_background(switch, site, TINY_V2) as switching:
                await receive_until(watcher, lambda e: e["type"] == "model.state" and e["state"] == "switching")
                posted = [post(member, c, f"Question {n} during the switch") for n, c in enumerate(arrival, start=1)]
                assert not switching.done(), "The switch ended before the messages were sent: nothing was held."
                questions = [response.json() for response in posted]
                events = [
                    await receive_until(sockets[c], state_of(q["id"], *ENDED), timeout=90) for c, q in zip(arrival, questions)
                ]
                assert switching.result(timeout=60).status_code == 200
        assert [(r.status_code, q["status"]) for r, q in zip(posted, questions)] == [(202, "queued")] * 5
        found = answered(site, [q["id"] for q in questions])

    for place, (seen, question) in enumerate(zip(events, questions), start=1):
        queued = [e["position"] for e in seen if e["type"] == "chat.queued" and e["message_id"] == question["id"]]
        assert queued and queued[0] == place, f"Question {place} was told its place was {queued}"
        kinds = [e.get("state", e["type"]) for e in seen]
        started = seen.index(next(e for e in seen if state_of(question["id"], "generating")(e)))
        ready = [i for i, e in enumerate(seen) if e["type"] == "model.state" and e["state"] == "ready"]
        assert ready and ready[0] < started, f"Question {place} was answered before the model was ready: {kinds}"
    ids = [q["id"] for q in questions]
    assert answer_order(site, ids) == ids
    assert [(found[i]["status"], found[i]["answer"]["status"], found[i]["answer"]["model_name"]) for i in ids] == [
        ("done", "done", TINY_V2)
    ] * 5


def test_a_queued_message_cancelled_by_its_author_is_never_answered(site: Site) -> None:
    make_active(site, None)
    with site.session(MEMBER) as member, site.session(OUTSIDER) as outsider:
        conversation = member.post("/api/conversations/", json={}).json()["id"]
        other = member.post("/api/conversations/", json={}).json()["id"]
        with chat_socket(site, member, conversation) as socket, chat_socket(site, member, other) as other_socket:
            cancelled = post(member, conversation, "Never mind this one").json()
            kept = post(member, other, "But answer this one").json()
            receive_blocking(other_socket, lambda e: e == {"type": "chat.queued", "message_id": kept["id"], "position": 2})
            assert outsider.post(f"/api/messages/{cancelled['id']}/stop/").status_code == 404
            assert rows(site, [cancelled["id"]])[cancelled["id"]]["status"] == "queued"
            stopped = member.post(f"/api/messages/{cancelled['id']}/stop/")
            events = receive_blocking(socket, state_of(cancelled["id"], "cancelled"))
            # The message behind the cancelled one moves up.
            receive_blocking(other_socket, lambda e: e == {"type": "chat.queued", "message_id": kept["id"], "position": 1})
        assert stopped.status_code == 200
        assert (stopped.json()["id"], stopped.json()["status"]) == (cancelled["id"], "cancelled")
        assert events[-1]["message"]["content"] == "Never mind this one"

        assert switch(site, TINY).status_code == 200
        found = answered(site, [cancelled["id"], kept["id"]])
        assert (found[kept["id"]]["status"], found[kept["id"]]["answer"]["status"]) == ("done", "done")
        # The release that answered the later message passed over the cancelled one.
        passed_over = rows(site, [cancelled["id"]])[cancelled["id"]]
        assert (passed_over["status"], passed_over["answer"]) == ("cancelled", None)
        after = member.get(f"/api/conversations/{conversation}/messages/").json()
        assert [(m["role"], m["status"]) for m in after] == [("user", "cancelled")]


def test_past_the_queue_limit_a_new_message_is_refused_with_a_sentence(model_server: TabbyServer, tmp_path: Path) -> None:
    env = {"GANTRY_MAX_QUEUED": "3", "GANTRY_MAX_ANSWER_TOKENS": "16"}
    with run_site(tmp_path / "site", model_server.url, extra_env=env) as site, site.session(MEMBER) as member:
        make_active(site, None)
        conversation = member.post("/api/conversations/", json={}).json()["id"]
        held = [post(member, conversation, f"Held {n}") for n in range(1, 4)]
        assert [(r.status_code, r.json()["status"]) for r in held] == [(202, "queued")] * 3

        refused = post(member, conversation, "One too many")
        assert refused.status_code == 400
        assert refused.json() == {
            "detail": "3 messages are already waiting for the model. Try again in a moment; your text is still here."
        }
        saved = member.get(f"/api/conversations/{conversation}/messages/").json()
        assert [m["content"] for m in saved] == ["Held 1", "Held 2", "Held 3"]

        # A cancelled message leaves the queue, which makes room again.
        assert member.post(f"/api/messages/{held[0].json()['id']}/stop/").json()["status"] == "cancelled"
        again = post(member, conversation, "One too many")
        assert (again.status_code, again.json()["status"]) == (202, "queued")

        assert switch(site, TINY).status_code == 200
        ids = [r.json()["id"] for r in (*held[1:], again)]
        found = answered(site, ids)
        assert [found[i]["status"] for i in ids] == ["done"] * 3


def test_one_person_cannot_fill_the_queue_and_retry_obeys_both_limits(model_server: TabbyServer, tmp_path: Path) -> None:
    env = {"GANTRY_MAX_QUEUED": "4", "GANTRY_MAX_QUEUED_PER_USER": "2", "GANTRY_MAX_ANSWER_TOKENS": "16"}
    mine_full = (
        "You already have 2 messages waiting for the model (the limit is 2). "
        "Send this one once some are answered; your text is still here."
    )
    all_full = "4 messages are already waiting for the model. Try again in a moment; your text is still here."
    with run_site(tmp_path / "site", model_server.url, extra_env=env) as site:
        with site.session(MEMBER) as member, site.session(OUTSIDER) as outsider, site.session(ADMIN) as admin:
            make_active(site, None)
            people = (("m", member), ("o", outsider), ("a", admin))
            chats = {name: client.post("/api/conversations/", json={}).json()["id"] for name, client in people}
            held = [post(member, chats["m"], f"Mine {n}") for n in (1, 2)]
            mine_refused = post(member, chats["m"], "Mine 3")
            held += [post(outsider, chats["o"], f"Theirs {n}") for n in (1, 2)]
            all_refused = post(admin, chats["a"], "Admin 1")
            assert [r.status_code for r in held] == [202] * 4
            assert (mine_refused.status_code, mine_refused.json()) == (400, {"detail": mine_full})
            assert (all_refused.status_code, all_refused.json()) == (400, {"detail": all_full})

            # Retry: a stopped message sent again waits in the same queue, within the same limits.
            stopped = held[0].json()["id"]
            assert member.post(f"/api/messages/{stopped}/stop/").json()["status"] == "cancelled"
            replaced = post(member, chats["m"], "Mine 3")  # the member's room, taken again
            retried = member.post(f"/api/messages/{stopped}/retry/")
            assert (replaced.status_code, retried.status_code, retried.json()) == (202, 400, {"detail": mine_full})
            outsiders = held[2].json()["id"]
            assert outsider.post(f"/api/messages/{outsiders}/stop/").json()["status"] == "cancelled"
            assert post(admin, chats["a"], "Admin 1").status_code == 202  # the queue is full again
            retried_when_full = outsider.post(f"/api/messages/{outsiders}/retry/")
            assert (retried_when_full.status_code, retried_when_full.json()) == (400, {"detail": all_full})
            still = rows(site, [stopped, outsiders])
            assert (still[stopped]["status"], still[outsiders]["status"]) == ("cancelled", "cancelled")

            assert switch(site, TINY).status_code == 200
            waiting = [held[1].json()["id"], replaced.json()["id"], held[3].json()["id"]]
            found = answered(site, waiting)
            assert [found[i]["status"] for i in waiting] == ["done"] * 3


def test_an_answer_cut_off_by_an_unload_after_the_drain_is_queued_again_and_answered_by_the_next_model(
    long_site: Site,
) -> None:
    site = long_site
    with site.session(MEMBER) as member:
        # The tiny model sometimes ends an answer early; then the model is loaded again and we ask again, in a
        # new conversation (an answer in the history would leave little of the context for the next one).
        for _ in range(5):
            make_active(site, TINY)
            conversation = member.post("/api/conversations/", json={}).json()["id"]
            with chat_socket(site, member, conversation) as socket:
                question = post(member, conversation, "Tell me a long story").json()
                events = receive_blocking(socket, state_of(question["id"], "generating"), timeout=90)
                with in_background(unload, site) as unloading:
                    events += receive_blocking(socket, state_of(question["id"], "queued", *ENDED), timeout=90)
                    assert unloading.result(timeout=60).status_code == 200
            if events[-1]["message"]["status"] != "done":
                break
        else:
            raise AssertionError("Every answer ended before the unload could cut it.")
        assert events[-1]["message"]["status"] == "queued", events[-1]
        draining = [e["text"] for e in events if e["type"] == "model.progress" and e["step"] == "draining"]
        assert "Waiting for 1 answer to finish..." in draining
        assert events[-1]["message"]["error"] == SWITCHED_AWAY

        held = rows(site, [question["id"]])[question["id"]]
        assert (held["status"], held["error"]) == ("queued", SWITCHED_AWAY)
        assert (held["answer"]["status"], held["answer"]["content"], held["answer"]["error"]) == ("cancelled", "", SWITCHED_AWAY)
        answer_id = held["answer"]["id"]
        assert backend(site)["state"] == "unloaded"

        assert switch(site, TINY_V2).status_code == 200
        found = answered(site, [question["id"]])[question["id"]]
        assert (found["status"], found["error"]) == ("done", "")
        assert (found["answer"]["id"], found["answer"]["status"], found["answer"]["model_name"]) == (answer_id, "done", TINY_V2)


def test_messages_held_across_a_restart_of_the_web_process_are_answered_once_a_model_is_switched_in(site: Site) -> None:
    make_active(site, None)
    with site.session(MEMBER) as member:
        conversations = [member.post("/api/conversations/", json={}).json()["id"] for _ in range(3)]
        ids = [post(member, c, f"Still there after the restart? {n}").json()["id"] for n, c in enumerate(conversations)]

    stop(web_process(site))
    assert {q["status"] for q in rows(site, ids).values()} == {"queued"}
    before = query(site, "SELECT refreshed_at FROM models_admin_backend")[0]["refreshed_at"]
    start_daphne(site, port_of(site), name="daphne-restarted")
    # The new process has looked at the model server (nothing loaded) and holds the messages still.
    wait_until(lambda: query(site, "SELECT refreshed_at FROM models_admin_backend")[0]["refreshed_at"] != before, 30, "a refresh")
    assert {q["status"] for q in rows(site, ids).values()} == {"queued"}

    assert switch(site, TINY).status_code == 200
    found = answered(site, ids)
    assert [(found[i]["status"], found[i]["answer"]["status"], found[i]["answer"]["model_name"]) for i in ids] == [
        ("done", "done", TINY)
    ] * 3


def test_an_answer_left_generating_by_a_killed_web_process_is_queued_again_and_answered_after_a_restart(
    long_site: Site,
) -> None:
    site = long_site
    make_active(site, TINY)
    with site.session(MEMBER) as member:
        # The tiny model sometimes ends an answer early; then the web process is started again and we ask again,
        # in a new conversation (an answer in the history would leave little of the context for the next one).
        for attempt in range(5):
            conversation = member.post("/api/conversations/", json={}).json()["id"]
            with chat_socket(site, member, conversation) as socket:
                question = post(member, conversation, "Tell me a long story").json()
                receive_blocking(socket, token_or(state_of(question["id"], *ENDED)), timeout=90)
                process = web_process(site)
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
                killed_at = time.monotonic()
            left = rows(site, [question["id"]])[question["id"]]
            start_daphne(site, port_of(site), name=f"daphne-after-kill-{attempt}")
            if left["status"] == "generating":
                break
        else:
            raise AssertionError("Every answer ended before the web process was killed.")
        assert left["answer"]["status"] == "generating"

    with site.session(MEMBER) as member, chat_socket(site, member, conversation) as socket:
        events = receive_blocking(socket, state_of(question["id"], *ENDED), timeout=90)
    requeued = [e["message"] for e in events if state_of(question["id"], "queued")(e)]
    assert requeued and requeued[0]["error"] == PROCESS_DIED
    # Only an answer silent for 10 s counts as orphaned (its process may just be slow).
    assert time.monotonic() - killed_at >= 8
    found = rows(site, [question["id"]])[question["id"]]
    assert (found["status"], found["error"], found["answer"]["status"], found["answer"]["model_name"]) == (
        "done",
        "",
        "done",
        TINY,
    )
