"""The model's state on the site follows TabbyAPI's within seconds, whoever changes it: a model the server
loads at its start, a model loaded or unloaded directly on TabbyAPI, a server that goes away and comes
back, and a server frozen by SIGSTOP, which must not freeze the site's pages.

One live site with the default refresh interval (60 s): everything seen here within seconds comes from
the watcher, not from the periodic refresh. Its model server runs on one port and is restarted by the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, receive_until, run_site
from harness.tabby_server import TabbyServer, load_events, wait_healthy, wait_loaded
from tests.models_admin.live import RestartableTabby, backend, disagreement, loaded_model, query, wait_until

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
DOWN = "The model server cannot be reached right now. Your message is kept: press Retry to send it again."
CHECK_TIMEOUT = 2.0
# The server's first start loads the 200 MB model from a 10 MB/s disk: about twenty seconds, during which
# TabbyAPI's `GET /v1/model` answers 503, as when nothing is loaded.
SLOW_START = {"model": {"model_name": SMALL, "load_throttle_mbps": 10}, "developer": {"cpu_threads": 1}}
QUICK_START = {"model": {"model_name": TINY}, "developer": {"cpu_threads": 1}}


@pytest.fixture(scope="module")
def model_server(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableTabby]:
    server = RestartableTabby(tmp_path_factory.mktemp("tabby"), demo_models)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def site(model_server: RestartableTabby, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The site comes up while its model server is still loading the model it starts with."""
    model_server.start(SLOW_START)
    env = {"TABBY_CHECK_TIMEOUT": str(CHECK_TIMEOUT), "GANTRY_MAX_ANSWER_TOKENS": "8"}
    with run_site(tmp_path_factory.mktemp("site"), model_server.url, extra_env=env) as site:
        yield site


@pytest.fixture
def tabby(model_server: RestartableTabby, site: Site) -> TabbyServer:
    """The model server, running, with a model loaded (the tiny one after a restart)."""
    server = model_server.start(QUICK_START)
    wait_until(lambda: loaded_model(server) is not None, 120, "the model server's start-up load")
    return server


def first_time(checks: dict[str, Callable[[], bool]], timeout: float) -> dict[str, float]:
    """Poll the checks every 50 ms; the monotonic time each first came true."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(checks):
        assert time.monotonic() < deadline, f"Only {sorted(seen)} came true within {timeout:g} s."
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.monotonic()
        time.sleep(0.05)
    return seen


def new_conversation(client: httpx.Client) -> int:
    return int(client.post("/api/conversations/", json={}).json()["id"])


def post(client: httpx.Client, conversation: int, text: str) -> dict[str, Any]:
    response = client.post(f"/api/conversations/{conversation}/messages/", json={"content": text})
    assert response.status_code == 202, response.text
    return dict(response.json())


def message(client: httpx.Client, conversation: int, message_id: int) -> dict[str, Any]:
    return next(m for m in client.get(f"/api/conversations/{conversation}/messages/").json() if m["id"] == message_id)


def answer_of(client: httpx.Client, conversation: int, question_id: int) -> dict[str, Any] | None:
    found = [m for m in client.get(f"/api/conversations/{conversation}/messages/").json() if m.get("reply_to") == question_id]
    return found[0] if found else None


def state_is(state: str, model: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == "model.state" and e["state"] == state and (model is None or e["active_model"] == model)


# Start-up


def test_a_model_the_server_loads_at_its_start_is_ready_on_the_site_within_two_seconds_of_the_load(
    site: Site, model_server: RestartableTabby
) -> None:
    server = model_server.start(SLOW_START)
    with site.session(MEMBER) as member:
        assert member.get("/").status_code == 200  # a newcomer opens the chat page meanwhile
    first_refresh = "SELECT refreshed_at FROM models_admin_backend WHERE refreshed_at IS NOT NULL"
    wait_until(lambda: query(site, first_refresh), 10, "the site's first refresh")
    assert loaded_model(server) is None, "the start-up load ended before the site asked: nothing to watch"
    assert backend(site)["state"] == "unloaded"
    when = first_time(
        {
            "tabby": lambda: loaded_model(server) == SMALL,
            "site": lambda: (row := backend(site))["state"] == "ready" and row["active_model"] == SMALL,
        },
        timeout=120,
    )
    assert when["site"] - when["tabby"] < 2.0, f"The site saw the model {when['site'] - when['tabby']:.1f} s after TabbyAPI had it."
    with site.session(ADMIN) as admin:
        assert disagreement(site, admin, server) is None


# Changes made directly on TabbyAPI


def test_a_model_loaded_directly_on_tabbyapi_answers_a_waiting_message_within_two_seconds(site: Site, tabby: TabbyServer) -> None:
    with site.session(ADMIN) as admin:
        # Gantry unloads it itself: the state is certain, so only the waiting message makes the site look.
        assert admin.post("/api/admin/models/unload").json() == {"message": "Model unloaded successfully"}
        with site.session(MEMBER) as member:
            conversation = new_conversation(member)
            question = post(member, conversation, "Is anyone loading a model?")
            assert question["status"] == "queued"
            assert load_events(tabby, TINY, load_throttle_mbps=2)[-1]["status"] == "finished"
            loaded_at = time.monotonic()
            started = first_time({"answer": lambda: message(member, conversation, question["id"])["status"] != "queued"}, 30)
            assert started["answer"] - loaded_at < 2.0
            answered = wait_until(lambda: (a := answer_of(member, conversation, question["id"])) and a["status"] == "done" and a, 60, "the answer")
        assert answered["model_name"] == TINY
        assert disagreement(site, admin, tabby) is None


# A model server that goes away, and one that freezes


async def test_an_unreachable_model_server_shows_within_five_seconds_and_its_return_within_five(
    site: Site, tabby: TabbyServer, model_server: RestartableTabby
) -> None:
    with site.session(MEMBER) as member, site.session(ADMIN) as admin:
        conversation = new_conversation(member)
        async with site.socket(f"/ws/chat/{conversation}/", member) as socket, site.socket("/ws/models/", admin) as models:
            await receive_until(socket, state_is("ready"))
            model_server.stop()
            stopped_at = time.monotonic()
            first = post(member, conversation, "Hello?")
            # Noticed by the watcher (pages are open) or by this message's failed request, whichever is first.
            await receive_until(socket, state_is("unreachable"), timeout=5)
            assert time.monotonic() - stopped_at < 5.0
            (news,) = (await receive_until(models, state_is("unreachable"), timeout=5))[-1:]
            assert news["trouble"] == "unreachable" and "cannot be reached" in news["trouble_text"]
            # Failed with the sentence if it reached the dead server before the state changed, else held.
            first_now = message(member, conversation, first["id"])
            assert first_now["error"] == DOWN if first_now["status"] == "failed" else first_now["status"] == "queued"

            # Known to be down: a new message is held for the server's return instead of failing.
            second = post(member, conversation, "Hello again?")
            assert second["status"] == "queued"
            back = model_server.start(QUICK_START)
            wait_loaded(back, TINY)
            back_at = time.monotonic()
            await receive_until(socket, state_is("ready", TINY), timeout=5)
            assert time.monotonic() - back_at < 5.0
            await receive_until(
                socket, lambda e: e["type"] == "chat.message" and e["message"]["id"] == second["id"] and e["message"]["status"] == "done"
            )
        assert disagreement(site, admin, back) is None


async def test_an_open_page_learns_within_five_seconds_that_the_model_server_went_away_and_came_back(
    site: Site, tabby: TabbyServer, model_server: RestartableTabby
) -> None:
    """Nothing is sent and nothing waits: someone only looks at the chat page, whose banner must tell."""
    with site.session(MEMBER) as member:
        conversation = new_conversation(member)
        async with site.socket(f"/ws/chat/{conversation}/", member) as socket:
            await receive_until(socket, state_is("ready"))
            model_server.stop()
            stopped_at = time.monotonic()
            await receive_until(socket, state_is("unreachable"), timeout=10)
            gone_after = time.monotonic() - stopped_at
            back = model_server.start(QUICK_START)
            wait_loaded(back, TINY)
            back_at = time.monotonic()
            await receive_until(socket, state_is("ready", TINY), timeout=10)
            back_after = time.monotonic() - back_at
    assert gone_after < 5.0
    assert back_after < 5.0


async def test_a_model_unloaded_directly_on_tabbyapi_holds_the_next_message_until_a_model_is_back(
    site: Site, tabby: TabbyServer
) -> None:
    with site.session(MEMBER) as member:
        conversation = new_conversation(member)
        async with site.socket(f"/ws/chat/{conversation}/", member) as socket:
            await receive_until(socket, state_is("ready", TINY))
            with tabby.client(admin=True) as direct:
                assert direct.post("/v1/model/unload").status_code == 200
            question = post(member, conversation, "Still there?")
            # TabbyAPI refuses the answer (503): the message is held, not failed, and the banner follows.
            await receive_until(socket, state_is("unloaded"), timeout=10)
            held = wait_until(lambda: (m := message(member, conversation, question["id"]))["status"] == "queued" and m, 10, "the message to be held")
            assert held["error"] == ""
            assert load_events(tabby, TINY)[-1]["status"] == "finished"
            await receive_until(socket, state_is("ready", TINY), timeout=5)
            events = await receive_until(
                socket, lambda e: e["type"] == "chat.message" and e["message"]["id"] == question["id"] and e["message"]["status"] == "done"
            )
    assert not [e for e in events if e["type"] == "chat.error"]


def timed(client: httpx.Client, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = client.request(method, url, **kwargs)
    return response, time.monotonic() - started


def test_a_frozen_model_server_does_not_freeze_the_pages(site: Site, tabby: TabbyServer, model_server: RestartableTabby) -> None:
    wait_until(lambda: backend(site)["state"] == "ready", 10, "the site to see the model")
    active = backend(site)["active_model"]
    with site.session(ADMIN) as admin, site.session(ADMIN) as switcher, site.session(MEMBER) as member:
        model_server.freeze()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            # The switch checks with TabbyAPI first (it is the active model), in a page's thread.
            switching = pool.submit(timed, switcher, "POST", "/api/admin/models/switch", json={"model_id": active}, timeout=120)
            slow = []
            for _ in range(3):
                for client, url in ((member, "/"), (admin, "/admin/models/"), (admin, "/api/admin/models"), (admin, "/admin/activity/")):
                    response, took = timed(client, "GET", url)
                    assert response.status_code == 200, url
                    slow += [(url, round(took, 2))] if took >= 1.0 else []
            refreshed, took = timed(admin, "POST", "/api/admin/models/refresh")
            assert not slow, f"Pages waited on the frozen model server: {slow}"
            assert refreshed.status_code == 502 and took < CHECK_TIMEOUT + 2, (refreshed.text, took)
            body = refreshed.json()
            assert "stopped answering" in body["reason"] and body["models"]
            wait_until(lambda: backend(site)["state"] in ("unreachable", "switching"), 10, "the site to notice")
            assert not switching.done(), "the switch cannot have ended while the model server is frozen"
        finally:
            model_server.thaw()
            pool.shutdown(wait=False)
        switched, _ = switching.result(timeout=120)
        assert switched.status_code == 200, switched.text
        wait_healthy(tabby, 10)
        wait_until(lambda: disagreement(site, admin, tabby) is None, 10, "the state to agree with TabbyAPI")
