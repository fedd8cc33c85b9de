"""The sockets' heartbeat: one for the whole process, not one per socket. Each beat reads each session
once, however many pages it has open, and renews every socket's place (in this process, through
Channels' communicators and the in-memory channel layer)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client
from pytest_django.fixtures import Settings

from gantry import sockets
from gantry.asgi import application
from gantry.socket_slots import places

PAGES = 6
BEAT = 0.5  # seconds


@sync_to_async
def session_of(username: str) -> tuple[int, str]:
    user = User.objects.create_user(username, password="a-password-of-theirs")
    client = Client()
    client.force_login(user)
    return user.pk, client.cookies["session_id"].value


def headers(session: str) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"localhost"), (b"origin", b"http://localhost"), (b"cookie", f"session_id={session}".encode())]


@pytest.mark.django_db(transaction=True)
async def test_one_heartbeat_reads_each_session_once_for_all_its_pages(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gantry.asgi._started", True)  # no background work of a web process here
    settings.GANTRY_SOCKET_HEARTBEAT = BEAT
    reads: list[Any] = []
    holds = sockets.session_holds

    def counted(user_id: Any, session_key: str | None) -> bool:
        reads.append(session_key)
        return holds(user_id, session_key)

    monkeypatch.setattr(sockets, "session_holds", counted)
    user_id, session = await session_of("reader")
    pages = [WebsocketCommunicator(application, "/ws/chat/", headers=headers(session)) for _ in range(PAGES)]
    for page in pages:
        connected, _ = await page.connect(timeout=10)
        assert connected
        assert (await page.receive_json_from(timeout=10))["type"] == "model.state"
    beats = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "_beat"]  # type: ignore[union-attr]
    reads.clear()
    await asyncio.sleep(BEAT * 3.5)
    held = await sync_to_async(cache.get_many)(places(user_id))
    for page in pages:
        await page.disconnect()
    assert len(beats) == 1, "one heartbeat task for every socket of the process"
    assert 2 <= len(reads) <= 4, f"one session read a beat, not one a page: {len(reads)} reads in 3.5 beats"
    assert len(held) == PAGES, "every page keeps its place"
    await asyncio.sleep(0.1)
    assert beats[0].done(), "the heartbeat ends with the last socket"
