"""The chat socket (`ws/chat/` and `ws/chat/<conversation_id>/`) on the real ASGI application.

First against the live site (daphne) with a real WebSocket client, then in this process through
Channels' communicators and the in-memory channel layer, with the real model server answering.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator, WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import Client
from pytest_django.fixtures import Settings
from websockets.exceptions import InvalidStatus

from gantry.asgi import application
from harness.site import MEMBER, OUTSIDER, Site, receive_until
from harness.tabby_server import ADMIN_KEY, API_KEY, TabbyServer
from models_admin.models import Backend
from tests.conftest import TINY

Event = dict[str, Any]


def the_answer_streamed(events: list[Event]) -> tuple[list[str], Event, Event]:
    """The answer's tokens, its `chat.done` and its last `chat.message`, checked to come in that order."""
    final = events[-1]["message"]
    tokens = [e for e in events if e["type"] == "chat.token" and e["message_id"] == final["id"]]
    done = [e for e in events if e["type"] == "chat.done" and e["message_id"] == final["id"]]
    assert len(done) == 1
    assert events.index(tokens[-1]) < events.index(done[0]) < len(events) - 1
    return [t["text"] for t in tokens], done[0], final


def is_final_answer(event: Event) -> bool:
    return event["type"] == "chat.message" and event["message"]["role"] == "assistant" and event["message"]["status"] == "done"


# Against the live site


async def test_an_answer_streams_as_tokens_then_done_then_the_whole_message(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
            first = json.loads(await socket.recv())
            question = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Hello"}).json()
            events = await receive_until(socket, is_final_answer)
    assert first["type"] == "model.state"  # the banner's state comes first
    tokens, done, answer = the_answer_streamed(events)
    assert len(tokens) > 1
    assert done["status"] == "done"
    assert answer["reply_to"] == question["id"]
    assert answer["content"] == "".join(tokens)


@contextmanager
def busy(site: Site, tabs: int = 6) -> Iterator[None]:
    """Keep the site busy: other tabs of the member load the chat page over and over."""
    done = threading.Event()

    def load_pages() -> None:
        with site.session(MEMBER) as tab:
            while not done.is_set():
                tab.get("/")

    threads = [threading.Thread(target=load_pages) for _ in range(tabs)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        done.set()
        for thread in threads:
            thread.join()


async def test_every_token_reaches_the_page_while_the_site_is_busy(site: Site) -> None:
    with site.session(MEMBER) as client, busy(site):
        for _ in range(2):
            conversation = client.post("/api/conversations/", json={}).json()
            async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
                client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Hello"})
                tokens, _, answer = the_answer_streamed(await receive_until(socket, is_final_answer))
            assert answer["content"] == "".join(tokens)


async def test_an_anonymous_socket_is_refused(site: Site) -> None:
    for path in ("/ws/chat/", "/ws/chat/1/"):
        with pytest.raises(InvalidStatus) as refused:
            async with site.socket(path):
                pass
        assert refused.value.response.status_code == 403


async def test_an_outsider_socket_to_a_members_conversation_is_refused(site: Site) -> None:
    with site.session(MEMBER) as member, site.session(OUTSIDER) as outsider:
        conversation = member.post("/api/conversations/", json={}).json()
        with pytest.raises(InvalidStatus) as refused:
            async with site.socket(f"/ws/chat/{conversation['id']}/", outsider):
                pass
        async with site.socket("/ws/chat/", outsider) as own:  # the outsider's own sidebar socket works
            greeting = json.loads(await own.recv())
    assert refused.value.response.status_code == 403
    assert greeting["type"] == "model.state"


async def test_a_socket_opened_from_another_site_is_refused(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        with pytest.raises(InvalidStatus) as refused:
            async with site.socket(f"/ws/chat/{conversation['id']}/", client, origin="http://evil.example"):
                pass
    assert refused.value.response.status_code == 403


# In this process


@pytest.fixture
def model_server(settings: Settings, tabby: TabbyServer, transactional_db: None, monkeypatch: pytest.MonkeyPatch) -> TabbyServer:
    """The `tabby` server, with the tiny model loaded as the site's refresh would have recorded it."""
    # No periodic refresh thread: a web process's would outlive the test and write to later tests' databases.
    monkeypatch.setattr("gantry.asgi._started", True)
    settings.TABBY_HOST = tabby.url
    settings.TABBY_API_KEY = API_KEY
    settings.TABBY_ADMIN_KEY = ADMIN_KEY
    Backend.objects.update_or_create(
        name="default", defaults={"base_url": tabby.url, "state": Backend.State.READY, "active_model": TINY}
    )
    return tabby


@pytest.fixture
async def answers_finish() -> AsyncIterator[None]:
    """Fail a test that leaves work running on the event loop (an answer still streaming, say)."""
    yield
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        _, running = await asyncio.wait(others, timeout=15)
        assert not running, f"Still running after the test: {running}"


@sync_to_async
def session_of(username: str) -> str:
    """A new user's session cookie, as logging in would set it."""
    user = User.objects.create_user(username, password="a-password-of-theirs")
    client = Client()
    client.force_login(user)
    return client.cookies["session_id"].value


def headers(session: str | None, origin: str | None = "http://localhost") -> list[tuple[bytes, bytes]]:
    """A page's headers; scripts calling the API send no Origin."""
    found = [(b"host", b"localhost")]
    if origin is not None:
        found.append((b"origin", origin.encode()))
    if session is not None:
        found.append((b"cookie", f"session_id={session}".encode()))
    return found


async def api(method: str, path: str, session: str, body: Any = None) -> Any:
    payload = json.dumps(body).encode() if body is not None else b""
    extra = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    communicator = HttpCommunicator(application, method, path, body=payload, headers=headers(session, origin=None) + extra)
    response = await communicator.get_response(timeout=30)
    await communicator.wait(timeout=10)  # the request's own tasks end with it
    assert response["status"] < 300, response
    return json.loads(response["body"])


async def receive_from(communicator: WebsocketCommunicator, last: Callable[[Event], bool]) -> list[Event]:
    events: list[Event] = []
    while not events or not last(events[-1]):
        events.append(await communicator.receive_json_from(timeout=30))
    return events


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("model_server", "answers_finish")
async def test_in_process_an_answer_streams_through_the_channel_layer() -> None:
    session = await session_of("reader")
    conversation = await api("POST", "/api/conversations/", session, {})
    socket = WebsocketCommunicator(application, f"/ws/chat/{conversation['id']}/", headers=headers(session))
    connected, _ = await socket.connect(timeout=10)
    assert connected
    assert (await socket.receive_json_from(timeout=10))["type"] == "model.state"
    question = await api("POST", f"/api/conversations/{conversation['id']}/messages/", session, {"content": "Hello"})
    events = await receive_from(socket, is_final_answer)
    await socket.disconnect()
    tokens, done, answer = the_answer_streamed(events)
    assert len(tokens) > 1
    assert done["status"] == "done"
    assert answer["reply_to"] == question["id"]
    assert answer["content"] == "".join(tokens)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("model_server", "answers_finish")
async def test_in_process_an_anonymous_socket_is_refused() -> None:
    for path in ("/ws/chat/", "/ws/chat/1/"):
        socket = WebsocketCommunicator(application, path, headers=headers(None))
        connected, _ = await socket.connect(timeout=10)
        assert not connected


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("model_server", "answers_finish")
async def test_in_process_a_socket_to_another_users_conversation_is_refused() -> None:
    owner, other = await session_of("owner"), await session_of("other")
    conversation = await api("POST", "/api/conversations/", owner, {})
    refused = WebsocketCommunicator(application, f"/ws/chat/{conversation['id']}/", headers=headers(other))
    connected, _ = await refused.connect(timeout=10)
    own = WebsocketCommunicator(application, f"/ws/chat/{conversation['id']}/", headers=headers(owner))
    owner_connected, _ = await own.connect(timeout=10)
    await own.disconnect()
    assert not connected
    assert owner_connected
