"""The chat API against the live site: conversations, messages, their answers, Stop and Retry."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from harness.site import MEMBER, Site, receive_until

FINAL = {"done", "failed", "cancelled"}


def new_conversation(client: httpx.Client, **fields: str) -> dict[str, Any]:
    response = client.post("/api/conversations/", json=fields)
    assert response.status_code == 201, response.text
    return dict(response.json())


def messages_of(client: httpx.Client, conversation_id: int) -> list[dict[str, Any]]:
    response = client.get(f"/api/conversations/{conversation_id}/messages/")
    assert response.status_code == 200, response.text
    return list(response.json())


def settled(client: httpx.Client, conversation_id: int, timeout: float = 60) -> list[dict[str, Any]]:
    """The conversation's messages once none is waiting or being answered."""
    deadline = time.monotonic() + timeout
    while True:
        messages = messages_of(client, conversation_id)
        if messages and all(m["status"] in FINAL for m in messages):
            return messages
        assert time.monotonic() < deadline, f"Still being answered after {timeout:g} s: {messages}"
        time.sleep(0.1)


def test_a_new_conversation_has_an_id_and_a_title(site: Site) -> None:
    with site.session(MEMBER) as client:
        untitled = new_conversation(client)
        titled = new_conversation(client, title="Trip plans")
        listed = client.get("/api/conversations/").json()
    assert isinstance(untitled["id"], int) and untitled["title"] == "New conversation"
    assert titled["title"] == "Trip plans"
    ids = [c["id"] for c in listed]
    assert ids.index(titled["id"]) < ids.index(untitled["id"])  # newest first


def test_a_conversation_can_be_renamed(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = new_conversation(client)
        renamed = client.patch(f"/api/conversations/{conversation['id']}/", json={"title": "  Recipes  "})
        fetched = client.get(f"/api/conversations/{conversation['id']}/")
    assert renamed.status_code == 200
    assert renamed.json()["title"] == "Recipes"
    assert fetched.json()["title"] == "Recipes"


def test_a_blank_title_is_refused_with_a_sentence(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = new_conversation(client, title="Keep me")
        refused = client.patch(f"/api/conversations/{conversation['id']}/", json={"title": "   "})
        fetched = client.get(f"/api/conversations/{conversation['id']}/")
    assert refused.status_code == 400
    assert refused.json() == {"detail": "A conversation needs a title."}
    assert fetched.json()["title"] == "Keep me"


def test_a_deleted_conversation_is_gone_with_its_messages(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = new_conversation(client)
        client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Hello"})
        settled(client, conversation["id"])
        deleted = client.delete(f"/api/conversations/{conversation['id']}/")
        detail = client.get(f"/api/conversations/{conversation['id']}/")
        messages = client.get(f"/api/conversations/{conversation['id']}/messages/")
        listed = client.get("/api/conversations/").json()
    assert deleted.status_code == 204
    assert detail.status_code == 404 and messages.status_code == 404
    assert conversation["id"] not in [c["id"] for c in listed]


def test_a_posted_message_is_saved_at_once_and_then_answered(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = new_conversation(client)
        posted = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "What is a gantry?"})
        assert posted.status_code == 202
        question = posted.json()
        assert question["role"] == "user" and question["content"] == "What is a gantry?"
        assert question["status"] == "generating"  # the model is ready and nothing waits: answered at once
        messages = settled(client, conversation["id"])
        title = client.get(f"/api/conversations/{conversation['id']}/").json()["title"]
    assert [(m["id"], m["role"], m["status"]) for m in messages] == [
        (question["id"], "user", "done"),
        (messages[1]["id"], "assistant", "done"),
    ]
    assert messages[1]["content"]
    assert title == "What is a gantry?"  # the first message names a new conversation


def test_messages_are_listed_oldest_first_with_their_fields(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = new_conversation(client)
        for content in ("First question", "Second question"):
            client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": content})
            settled(client, conversation["id"])
        messages = messages_of(client, conversation["id"])
    assert [(m["role"], m["content"] if m["role"] == "user" else "") for m in messages] == [
        ("user", "First question"),
        ("assistant", ""),
        ("user", "Second question"),
        ("assistant", ""),
    ]
    assert all({"id", "role", "content", "status", "created"} <= m.keys() for m in messages)
    assert [m["created"] for m in messages] == sorted(m["created"] for m in messages)


def test_an_empty_message_is_refused_with_a_sentence(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = new_conversation(client)
        for content in ("", "  \n\t "):
            refused = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": content})
            assert refused.status_code == 400
            assert refused.json() == {"detail": "Type a message before sending."}
        assert messages_of(client, conversation["id"]) == []


def test_a_message_over_the_length_limit_is_refused_with_a_sentence_naming_the_limit(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = new_conversation(client)
        refused = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "a" * 32_001})
        assert messages_of(client, conversation["id"]) == []
        at_the_limit = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "a" * 32_000})
        settled(client, conversation["id"])  # whatever the model makes of it, nothing keeps running
    assert refused.status_code == 400
    assert refused.json() == {"detail": "This message has 32,001 characters; the limit is 32,000. Shorten it and send again."}
    assert at_the_limit.status_code == 202


def done_with(answer_id: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == "chat.done" and e["message_id"] == answer_id


def message_of(answer_id: int) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == "chat.message" and e["message"]["id"] == answer_id


async def stopped_mid_answer(site: Site, client: httpx.Client, stop_the_answer: bool) -> tuple[dict[str, Any], str]:
    """Post a message and press Stop once its answer streams; returns the question and the text streamed.

    The tiny model sometimes ends an answer within milliseconds, even before its first token; when the
    answer was over before Stop landed, ask again.
    """
    conversation = new_conversation(client)
    async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
        for _ in range(5):
            question = client.post(
                f"/api/conversations/{conversation['id']}/messages/", json={"content": "Tell me a story"}
            ).json()
            events = await receive_until(socket, lambda e: e["type"] in {"chat.token", "chat.done"})
            answer_id = events[-1]["message_id"]
            if events[-1]["type"] == "chat.done":  # over before its first token: ask again
                await receive_until(socket, message_of(answer_id))
                continue
            stopped = client.post(f"/api/messages/{answer_id if stop_the_answer else question['id']}/stop/")
            assert stopped.status_code == 200, stopped.text
            events += await receive_until(socket, done_with(answer_id))
            events += await receive_until(socket, message_of(answer_id))
            if stopped.json()["status"] != "done":  # Stop landed while the answer was still being generated
                streamed = "".join(e["text"] for e in events if e["type"] == "chat.token" and e["message_id"] == answer_id)
                return question, streamed
    raise AssertionError("Every answer ended before Stop landed.")


async def test_stop_ends_the_answer_being_generated_as_cancelled_keeping_its_text(site: Site) -> None:
    with site.session(MEMBER) as client:
        question, streamed = await stopped_mid_answer(site, client, stop_the_answer=False)
        messages = messages_of(client, question["conversation"])
    asked, answer = messages[-2:]
    assert (asked["id"], asked["status"]) == (question["id"], "cancelled")
    assert (answer["role"], answer["status"]) == ("assistant", "cancelled")
    assert streamed and answer["content"] == streamed


async def test_stop_sent_for_the_answer_itself_stops_it_the_same_way(site: Site) -> None:
    with site.session(MEMBER) as client:
        question, streamed = await stopped_mid_answer(site, client, stop_the_answer=True)
        messages = messages_of(client, question["conversation"])
    asked, answer = messages[-2:]
    assert (asked["id"], asked["status"]) == (question["id"], "cancelled")
    assert (answer["role"], answer["status"]) == ("assistant", "cancelled")
    assert streamed and answer["content"] == streamed


async def test_retry_answers_a_stopped_message(site: Site) -> None:
    with site.session(MEMBER) as client:
        question, _ = await stopped_mid_answer(site, client, stop_the_answer=False)
        retried = client.post(f"/api/messages/{question['id']}/retry/")
        messages = settled(client, question["conversation"])
    assert retried.status_code == 202
    assert (retried.json()["id"], retried.json()["status"]) == (question["id"], "queued")
    asked, answer = messages[-2:]
    assert (asked["id"], asked["status"]) == (question["id"], "done")
    assert (answer["role"], answer["status"], answer["reply_to"]) == ("assistant", "done", question["id"])
    assert answer["content"]


def test_retry_of_an_answered_message_is_refused_with_a_sentence(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = new_conversation(client)
        client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Hello"})
        question, answer = settled(client, conversation["id"])
        again = client.post(f"/api/messages/{question['id']}/retry/")
        of_answer = client.post(f"/api/messages/{answer['id']}/retry/")
    assert again.status_code == 400
    assert again.json() == {"detail": "This message has already been answered."}
    assert of_answer.status_code == 400
    assert of_answer.json() == {"detail": "Only your own messages can be sent again."}
