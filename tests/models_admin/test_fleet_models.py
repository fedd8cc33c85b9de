"""Several models served at once: two real model servers on loopback holding different models (the tiny
model on the default backend, the small one on the second), behind one real site. A conversation follows
the default model unless its user picks another; its messages go to a backend holding that model, and
wait, while none does, until one loads it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from harness.site import ADMIN, MEMBER, Site, receive_until, run_site
from tests.conftest import TINY
from tests.gateway.live import make_key, openai_client
from tests.models_admin.fleet_live import SECOND, Pair, add_second, answered_by, by_name, started_pair
from tests.models_admin.live import query

SMALL = "Small-Chat-200M"
SMALL_SERVER = {"model": {"model_name": SMALL}, "developer": {"cpu_threads": 1}}
NOBODY_HAS = "Huge-Chat-Nowhere"


@pytest.fixture(scope="module")
def pair(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with started_pair(tmp_path_factory.mktemp("fleet"), demo_models, second=SMALL_SERVER, second_model=SMALL) as servers:
        yield servers


@pytest.fixture(scope="module")
def site(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    # Short answers: what is checked is which backend and model answer, and two answers of the small model
    # on one CPU thread, one after the other in a conversation, may otherwise take a minute on a busy machine.
    with run_site(tmp_path_factory.mktemp("site"), pair.first.url, extra_env={"GANTRY_MAX_ANSWER_TOKENS": "64"}) as site:
        add_second(site, pair.second.url)
        yield site


def conversation(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    created = client.post("/api/conversations/", json=fields)
    assert created.status_code == 201, created.text
    return dict(created.json())


def post(client: httpx.Client, conversation_id: int, content: str) -> dict[str, Any]:
    sent = client.post(f"/api/conversations/{conversation_id}/messages/", json={"content": content})
    assert sent.status_code == 202, sent.text
    return dict(sent.json())


def answers(site: Site, questions: list[int]) -> dict[int, tuple[str, str]]:
    """(backend, model) of each question's answer, once all are answered."""
    backends = answered_by(site, questions)
    rows = query(site, f"SELECT reply_to_id AS q, model_name FROM chat_message WHERE reply_to_id IN ({','.join('?' * len(questions))})", *questions)
    return {row["q"]: (backends[row["q"]], row["model_name"]) for row in rows}


def test_a_conversation_picks_a_model_through_the_api_and_unknown_models_are_refused(site: Site) -> None:
    with site.session(MEMBER) as member:
        plain = conversation(member, title="Plans")
        assert plain["model"] is None  # follows the default
        picked = member.patch(f"/api/conversations/{plain['id']}/", json={"model": SMALL})
        assert picked.status_code == 200, picked.text
        assert (picked.json()["model"], picked.json()["title"]) == (SMALL, "Plans")
        assert member.get(f"/api/conversations/{plain['id']}/").json()["model"] == SMALL
        for wrong in (NOBODY_HAS, 5, ["x"]):
            refused = member.patch(f"/api/conversations/{plain['id']}/", json={"model": wrong})
            assert refused.status_code == 400, refused.text
            assert refused.json()["detail"].endswith("."), refused.json()
        assert NOBODY_HAS in member.patch(f"/api/conversations/{plain['id']}/", json={"model": NOBODY_HAS}).json()["detail"]
        # Listed by the backends but served by none now: kept (its messages wait, "Model not available").
        assert member.patch(f"/api/conversations/{plain['id']}/", json={"model": "Large-Chat-1G"}).json()["model"] == "Large-Chat-1G"
        both = member.patch(f"/api/conversations/{plain['id']}/", json={"model": None, "title": "Back"})
        assert (both.json()["model"], both.json()["title"]) == (None, "Back")
        assert conversation(member, model=SMALL)["model"] == SMALL
        assert member.post("/api/conversations/", json={"model": NOBODY_HAS}).status_code == 400
        assert member.patch(f"/api/conversations/{plain['id']}/", json={"title": "Only the title"}).json()["model"] is None
    with site.session(ADMIN) as admin:
        models = {m["id"]: m for m in admin.get("/api/admin/models").json()["models"]}
    assert (models[TINY]["active"], models[TINY]["backends"]) == (True, ["default"])
    assert (models[SMALL]["active"], models[SMALL]["backends"]) == (False, [SECOND])


def test_a_conversation_that_picked_the_small_model_is_answered_by_its_backend_the_others_by_the_default(site: Site) -> None:
    with site.session(MEMBER) as member:
        small = conversation(member, model=SMALL)
        plain = conversation(member)
        questions = {post(member, small["id"], "Hello small")["id"]: (SECOND, SMALL)}
        questions[post(member, plain["id"], "Hello tiny")["id"]] = ("default", TINY)
        questions[post(member, small["id"], "And again")["id"]] = (SECOND, SMALL)
        assert answers(site, list(questions)) == questions


async def test_a_message_for_a_model_nobody_serves_waits_and_is_answered_once_a_backend_loads_it(site: Site) -> None:
    with site.session(MEMBER) as member, site.session(ADMIN) as admin:
        small = conversation(member, model=SMALL)
        plain = conversation(member)
        # The second backend moves to the tiny model: nobody serves the small one now.
        moved = admin.post(f"/api/admin/backends/{SECOND}/switch", json={"model_id": TINY}, timeout=120)
        assert moved.status_code == 200, moved.text
        assert by_name(admin)[SECOND]["active_model"] == TINY
        async with site.socket(f"/ws/chat/{small['id']}/", member) as page:
            greeting = (await receive_until(page, lambda e: e["type"] == "chat.models"))[-1]
            assert (greeting["default"], greeting["served"], greeting["loading"]) == (TINY, [TINY], [])
            held = post(member, small["id"], "Waiting for the small model")
            queued = await receive_until(page, lambda e: e["type"] == "chat.queued" and e["message_id"] == held["id"])
            assert queued[-1]["position"] == 1  # first among the messages waiting for the small model
            # Messages for the other model are not held behind it: answered at once, as they are saved.
            sent = post(member, plain["id"], "Not waiting")
            assert sent["status"] == "generating", sent
            other = sent["id"]
            assert answers(site, [other])[other][1] == TINY
            await asyncio.sleep(1)
            state = query(site, "SELECT status FROM chat_message WHERE id = ?", held["id"])
            assert state == [{"status": "queued"}]

            switching = asyncio.create_task(
                asyncio.to_thread(admin.post, f"/api/admin/backends/{SECOND}/switch", json={"model_id": SMALL}, timeout=180)
            )
            loading = await receive_until(page, lambda e: e["type"] == "chat.models" and SMALL in e["loading"], timeout=60)
            assert loading[-1]["served"] == [TINY]
            back = await switching
            assert back.status_code == 200, back.text
            served = await receive_until(page, lambda e: e["type"] == "chat.models" and SMALL in e["served"], timeout=60)
            assert served[-1]["served"] == [TINY, SMALL] and served[-1]["loading"] == []
        assert answers(site, [held["id"]]) == {held["id"]: (SECOND, SMALL)}


def test_an_api_request_naming_a_served_model_goes_to_its_backend_and_an_unknown_name_is_404(site: Site) -> None:
    client = openai_client(site, make_key(site, MEMBER)[1])
    assert [model.id for model in client.models.list()] == [TINY, SMALL]  # served now, the default first
    asked = [{"role": "user", "content": "Hello"}]
    small = client.chat.completions.create(model=SMALL, messages=asked, max_tokens=4)  # type: ignore[arg-type]
    default = client.chat.completions.create(messages=asked, max_tokens=4, model="")  # type: ignore[arg-type]
    # Each answer's `model` is the model of the backend that gave it; no model named: the default's.
    assert (small.model, default.model) == (SMALL, TINY)
    assert small.choices[0].message.content and default.choices[0].message.content
    # A name no model server has is refused (nothing is loaded for it), in OpenAI's shape.
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=asked, max_tokens=4)  # type: ignore[arg-type]
    assert isinstance(unknown.value.body, dict) and unknown.value.body["code"] == "model_not_found"
    assert query(site, "SELECT id FROM models_admin_operation WHERE source = 'request'") == []
