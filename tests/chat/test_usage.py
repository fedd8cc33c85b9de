"""Usage on a live site with the real model server: each answered request counts once for its user and
model, with the model server's own token counts and its time held and generating, whether it came from
the chat or the OpenAI-compatible API (whose conversations are deleted when the request ends); the Usage
tab's API is for admins; /metrics serves the same counters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import date
from typing import Any

import httpx
import pytest

from harness.site import ADMIN, MEMBER, OUTSIDER, Site, receive_until, run_site
from harness.tabby_server import TabbyServer
from tests.conftest import TINY
from tests.figures import moved, scrape, timestamp
from tests.gateway.live import make_key, openai_client
from tests.models_admin.live import query, wait_until

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "hold_seconds", "generation_seconds")


@pytest.fixture(scope="module")
def site(tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Short answers (the demo model rambles to the cap), long enough to be stopped half-way."""
    with run_site(tmp_path_factory.mktemp("site"), tabby.url, extra_env={"GANTRY_MAX_ANSWER_TOKENS": "80"}) as site:
        yield site


@pytest.fixture
def admin(site: Site) -> Iterator[httpx.Client]:
    with site.session(ADMIN) as client:
        yield client


def report(admin: httpx.Client, days: int = 1) -> dict[str, Any]:
    response = admin.get(f"/api/admin/usage?days={days}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def usage_of(admin: httpx.Client, user: str, model: str = TINY) -> dict[str, Any]:
    """The user's row for the model today (zeros when there is none yet)."""
    rows = [row for row in report(admin)["rows"] if (row["user"], row["model"]) == (user, model)]
    assert len(rows) <= 1
    return rows[0] if rows else {"user": user, "model": model, **dict.fromkeys(COUNTERS, 0)}


def change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {name: after[name] - before[name] for name in COUNTERS}


def new_conversation(client: httpx.Client) -> int:
    response = client.post("/api/conversations/", json={})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def post(client: httpx.Client, conversation_id: int, content: str) -> dict[str, Any]:
    response = client.post(f"/api/conversations/{conversation_id}/messages/", json={"content": content})
    assert response.status_code == 202, response.text
    return dict(response.json())


def created(site: Site, message_id: int) -> Any:
    return timestamp(query(site, "SELECT created FROM chat_message WHERE id = ?", message_id)[0]["created"])


def answer_of(site: Site, question_id: int) -> dict[str, Any]:
    """The answer's row (its status "" while the question waits for its answer to start)."""
    rows = query(site, "SELECT id, status FROM chat_message WHERE reply_to_id = ?", question_id)
    return rows[0] if rows else {"id": None, "status": ""}


# Chat


async def test_a_chat_answer_counts_once_with_the_model_servers_token_counts(site: Site, admin: httpx.Client) -> None:
    before = usage_of(admin, MEMBER[0])
    with site.session(MEMBER) as member:
        conversation = new_conversation(member)
        async with site.socket(f"/ws/chat/{conversation}/", member) as chat:
            started = time.monotonic()
            post(member, conversation, "Tell me about cranes.")
            done = (await receive_until(chat, lambda event: event["type"] == "chat.done"))[-1]
            elapsed = time.monotonic() - started
    spent = change(before, usage_of(admin, MEMBER[0]))

    assert done["status"] == "done" and done["model"] == TINY
    assert spent["requests"] == 1
    assert (spent["prompt_tokens"], spent["completion_tokens"]) == (
        done["usage"]["prompt_tokens"],
        done["usage"]["completion_tokens"],
    )
    assert spent["completion_tokens"] > 0 and spent["prompt_tokens"] > 0
    assert spent["hold_seconds"] == 0  # answered as it was posted: never held
    assert 0 < spent["generation_seconds"] < elapsed


def test_a_held_message_counts_the_time_it_waited(site: Site, admin: httpx.Client) -> None:
    """The second question of a conversation waits for the first one's answer (it needs it as context).
    The demo model may end an answer at once: pairs are asked until the second waited a tenth of a second."""
    for _ in range(5):
        before = usage_of(admin, MEMBER[0])
        with site.session(MEMBER) as member:
            conversation = new_conversation(member)
            post(member, conversation, "What is a gantry?")
            second = post(member, conversation, "And a crane?")
            assert second["status"] == "queued"
            wait_until(lambda asked=second: answer_of(site, asked["id"])["status"] == "done", 60, "both answers")
        spent = change(before, usage_of(admin, MEMBER[0]))
        # Its answer's row is made as it is released: the time between the two rows is the time it was held.
        waited = (created(site, answer_of(site, second["id"])["id"]) - created(site, second["id"])).total_seconds()
        if waited > 0.1:
            break
    else:
        pytest.fail("in 5 tries the first answer never held the second for a tenth of a second")

    assert spent["requests"] == 2
    assert spent["hold_seconds"] == pytest.approx(waited, abs=0.25)


async def test_a_stopped_answer_is_not_counted(site: Site, admin: httpx.Client) -> None:
    before = usage_of(admin, MEMBER[0])
    with site.session(MEMBER) as member:
        conversation = new_conversation(member)
        async with site.socket(f"/ws/chat/{conversation}/", member) as chat:
            question = post(member, conversation, "Write a long story about a gantry crane.")
            await receive_until(chat, lambda event: event["type"] == "chat.token")
            stopped = member.post(f"/api/messages/{question['id']}/stop/")
            done = (await receive_until(chat, lambda event: event["type"] == "chat.done"))[-1]

    assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled", stopped.text
    assert done["status"] == "cancelled"
    assert change(before, usage_of(admin, MEMBER[0])) == dict.fromkeys(COUNTERS, 0)


# The OpenAI-compatible API


def test_api_requests_count_for_the_keys_user_after_their_conversations_are_gone(site: Site, admin: httpx.Client) -> None:
    before = usage_of(admin, OUTSIDER[0])
    member_before = usage_of(admin, MEMBER[0])
    client = openai_client(site, make_key(site, OUTSIDER)[1])
    question = [{"role": "user", "content": "Name a color."}]
    whole = client.chat.completions.create(model=TINY, messages=question, max_tokens=12)  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model=TINY,
            messages=question,  # type: ignore[arg-type]
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=7)
    spent = change(before, usage_of(admin, OUTSIDER[0]))
    usages = [whole.usage, chunks[-1].usage, text.usage]
    assert all(usage is not None for usage in usages)

    assert spent["requests"] == 3
    assert spent["prompt_tokens"] == sum(usage.prompt_tokens for usage in usages if usage)
    assert spent["completion_tokens"] == sum(usage.completion_tokens for usage in usages if usage) == 12 + 9 + 7
    assert spent["generation_seconds"] > 0
    assert change(member_before, usage_of(admin, MEMBER[0])) == dict.fromkeys(COUNTERS, 0)  # the key's user only
    wait_until(lambda: not query(site, "SELECT id FROM chat_conversation WHERE source = 'api'"), 10, "the requests' rows to go")
    assert usage_of(admin, OUTSIDER[0])["requests"] == before["requests"] + 3  # kept after they went


# The Usage tab's API


def test_the_usage_api_is_for_admins(site: Site) -> None:
    anonymous = httpx.get(site.url + "/api/admin/usage")
    with site.session(MEMBER) as member:
        refused = member.get("/api/admin/usage")
        page = member.get("/admin/usage/", follow_redirects=False)
    assert anonymous.status_code == 401
    assert anonymous.json() == {"detail": "Log in as an admin first (POST /api/auth/login)."}
    assert refused.status_code == 403 and refused.json() == {"detail": "Only admins can read the usage."}
    assert page.status_code == 302 and page.headers["Location"].startswith("/login/")


def test_the_usage_api_reports_a_period_day_by_day(site: Site, admin: httpx.Client) -> None:
    with site.session(MEMBER) as member:
        conversation = new_conversation(member)
        question = post(member, conversation, "Hello there.")
        wait_until(lambda: answer_of(site, question["id"])["status"] == "done", 60, "the answer")
    month = report(admin, 30)
    default = admin.get("/api/admin/usage").json()
    today = date.fromisoformat(month["until"])

    assert default == month  # 30 days unless asked
    assert month["days"] == 30 and len(month["per_day"]) == 30
    assert [date.fromisoformat(day["day"]) for day in month["per_day"]][-1] == today
    assert date.fromisoformat(month["since"]) == date.fromisoformat(month["per_day"][0]["day"])
    # The days add up to the totals, and so do the rows.
    for name in COUNTERS:
        assert sum(day[name] for day in month["per_day"]) == pytest.approx(month["totals"][name], abs=0.01)
        assert sum(row[name] for row in month["rows"]) == pytest.approx(month["totals"][name], abs=0.01)
    assert month["per_day"][-1]["requests"] == month["totals"]["requests"] > 0  # all of it today
    for wrong in ("0", "367", "seven", "-3", "2.5"):
        response = admin.get(f"/api/admin/usage?days={wrong}")
        assert response.status_code == 400
        assert response.json() == {"detail": "days is a whole number of days from 1 to 366, like ?days=30."}
    assert admin.post("/api/admin/usage").status_code == 405


# /metrics


def test_the_metrics_count_usage_by_user_and_model(site: Site, admin: httpx.Client) -> None:
    before, figures_before = usage_of(admin, MEMBER[0]), scrape(admin)
    with site.session(MEMBER) as member:
        conversation = new_conversation(member)
        question = post(member, conversation, "Tell me about gantries.")
        wait_until(lambda: answer_of(site, question["id"])["status"] == "done", 60, "the answer")
    after, figures = usage_of(admin, MEMBER[0]), scrape(admin)
    labels = {"user": MEMBER[0], "model": TINY}

    assert moved(figures_before, figures, "gantry_usage_requests_total", **labels) == 1
    for name in ("prompt_tokens", "completion_tokens"):
        assert moved(figures_before, figures, f"gantry_usage_{name}_total", **labels) == after[name] - before[name] > 0
    for name in ("hold_seconds", "generation_seconds"):
        assert figures.get(f"gantry_usage_{name}_total", **labels) == pytest.approx(after[name], abs=0.01)
    assert figures.types["gantry_usage_requests_total"] == "counter"
