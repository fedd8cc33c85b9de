"""A page sends its messages over its conversation's socket (`chat.send`): the same rules as the API's
POST, answered `chat.sent` or `chat.refused` with the page's `ref`, on the live site (daphne)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from harness.site import MEMBER, Site, receive_until
from harness.tabby_server import free_port

Event = dict[str, Any]


def is_final_answer(event: Event) -> bool:
    return event["type"] == "chat.message" and event["message"]["role"] == "assistant" and event["message"]["status"] == "done"


def is_reply(event: Event) -> bool:
    return event["type"] in {"chat.sent", "chat.refused"}


async def test_a_message_sent_over_the_socket_is_saved_then_answered(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
            await socket.send(json.dumps({"type": "chat.send", "ref": 7, "content": "Hello over the socket"}))
            events = await receive_until(socket, is_final_answer)
        history = client.get(f"/api/conversations/{conversation['id']}/messages/").json()
        title = client.get(f"/api/conversations/{conversation['id']}/").json()["title"]
    sent = next(e for e in events if e["type"] == "chat.sent")
    assert sent["ref"] == 7
    assert sent["message"]["role"] == "user"
    assert sent["message"]["content"] == "Hello over the socket"
    tokens = [e["text"] for e in events if e["type"] == "chat.token"]
    answer = events[-1]["message"]
    assert answer["reply_to"] == sent["message"]["id"]
    assert answer["content"] == "".join(tokens) and tokens
    assert [(m["role"], m["status"]) for m in history] == [("user", "done"), ("assistant", "done")]
    assert history[0]["id"] == sent["message"]["id"]
    assert title == "Hello over the socket"  # as a POSTed first message names its conversation


async def test_a_message_over_the_size_limit_is_refused_with_a_sentence_and_not_saved(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
            await socket.send(json.dumps({"type": "chat.send", "ref": "a", "content": "x" * 32_001}))
            too_long = (await receive_until(socket, is_reply))[-1]
            await socket.send(json.dumps({"type": "chat.send", "ref": "b", "content": "   "}))
            blank = (await receive_until(socket, is_reply))[-1]
        history = client.get(f"/api/conversations/{conversation['id']}/messages/").json()
    assert too_long == {
        "type": "chat.refused",
        "ref": "a",
        "detail": "This message has 32,001 characters; the limit is 32,000. Shorten it and send again.",
    }
    assert blank == {"type": "chat.refused", "ref": "b", "detail": "Type a message before sending."}
    assert history == []


async def test_a_message_from_a_page_of_another_port_is_refused(site: Site) -> None:
    # A page of another port (or scheme) of the same host is another origin: its socket is refused at
    # the handshake, before it could send a message (or read the conversation's answers).
    other = f"http://127.0.0.1:{free_port()}"
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        with pytest.raises(InvalidStatus) as refused:
            async with site.socket(f"/ws/chat/{conversation['id']}/", client, origin=other) as socket:
                await socket.send(json.dumps({"type": "chat.send", "ref": 1, "content": "Hello"}))
        history = client.get(f"/api/conversations/{conversation['id']}/messages/").json()
    assert refused.value.response.status_code == 403
    assert history == []


async def test_the_sidebar_socket_and_a_deleted_conversation_take_no_message(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        async with site.socket("/ws/chat/", client) as sidebar:
            await sidebar.send(json.dumps({"type": "chat.send", "ref": 1, "content": "Hello"}))
            nowhere = (await receive_until(sidebar, is_reply))[-1]
        async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
            assert client.delete(f"/api/conversations/{conversation['id']}/").status_code == 204
            await socket.send(json.dumps({"type": "chat.send", "ref": 2, "content": "Hello"}))
            gone = (await receive_until(socket, is_reply))[-1]
        listed = client.get("/api/conversations/").json()
    assert nowhere == {"type": "chat.refused", "ref": 1, "detail": "Open a conversation to send a message."}
    assert gone == {"type": "chat.refused", "ref": 2, "detail": "This conversation was deleted."}
    assert conversation["id"] not in [c["id"] for c in listed]  # the message did not bring it back
