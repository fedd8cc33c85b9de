"""Relaying an answer to its pages: the pieces that came together go out as one event, complete and in
order; the growing answers are saved together now and then, never once a token; a Stop from elsewhere
ends the stream. TabbyAPI is faked at the one HTTP seam (httpx's MockTransport), the rest is real."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth.models import User

from chat import growing
from chat.models import Conversation, Message
from chat.streaming import Pace, Stopped, relay
from gantry.broadcast import conversation_group
from models_admin.tabby_client import TabbyClient, TabbyConfig

CONFIG = TabbyConfig(base_url="http://tabby.test:5055", api_key="test-api-key", admin_key="test-admin-key")
pytestmark = pytest.mark.django_db(transaction=True)


def event(text: str, finish: str | None = None) -> bytes:
    chunk = {"model": "Tiny-Chat-5M", "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\r\n\r\n".encode()


END = event("", "stop") + b"data: [DONE]\r\n\r\n"


class Reads(httpx.AsyncByteStream):
    """The response body as separate reads, `pause` seconds apart."""

    def __init__(self, reads: list[bytes], pause: float = 0.0) -> None:
        self.reads, self.pause = reads, pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            if self.pause:
                await asyncio.sleep(self.pause)
            yield read


def client_for(body: Reads) -> TabbyClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=body)

    return TabbyClient(CONFIG, transport=httpx.MockTransport(answer))


@sync_to_async
def answer_rows() -> Message:
    owner = User.objects.create_user(f"reader-{time.monotonic_ns()}", password="a-password-of-theirs")
    conversation = Conversation.objects.create(owner=owner)
    question = Message.objects.create(conversation=conversation, role=Message.Role.USER, content="Hi", status=Message.Status.GENERATING)
    return Message.objects.create(
        conversation=conversation, role=Message.Role.ASSISTANT, reply_to=question, status=Message.Status.GENERATING
    )


async def relayed(reply: Message, body: Reads) -> list[str]:
    """Relay the answer in `body`; returns the pieces it saw."""
    client = client_for(body)
    pieces: list[str] = []
    try:
        async with client.open_chat_batches([{"role": "user", "content": "Hi"}]) as stream:
            await relay(stream, reply, pieces, _nothing, Pace())
    finally:
        await client.aclose()
    return pieces


async def _nothing() -> None:
    pass


async def listening(reply: Message) -> tuple[Any, str]:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(conversation_group(reply.conversation_id), channel)
    return layer, channel


async def tokens_sent(layer: Any, channel: str) -> list[dict[str, Any]]:
    events = []
    while True:
        try:
            events.append(await asyncio.wait_for(layer.receive(channel), timeout=0.2))
        except TimeoutError:
            return [e for e in events if e["type"] == "chat.token"]


async def test_pieces_that_came_together_go_out_as_one_event_complete_and_in_order() -> None:
    reply = await answer_rows()
    layer, channel = await listening(reply)
    words = [f"w{n} " for n in range(12)]
    reads = [b"".join(event(w) for w in words[:5]), event(words[5]), b"".join(event(w) for w in words[6:]) + END]
    await relayed(reply, Reads(reads))
    tokens = await tokens_sent(layer, channel)
    assert [t["text"] for t in tokens] == ["".join(words[:5]), words[5], "".join(words[6:])]
    assert all(t["message_id"] == reply.pk for t in tokens)


async def test_a_growing_answer_is_saved_now_and_then_not_once_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    saves: list[dict[int, str]] = []
    save = growing._save

    def counted(contents: dict[int, str], question_ids: list[int]) -> set[int]:
        saves.append(dict(contents))
        return save(contents, question_ids)

    monkeypatch.setattr(growing, "_save", counted)
    reply = await answer_rows()
    words = [f"w{n} " for n in range(150)]
    started = time.monotonic()
    pieces = await relayed(reply, Reads([event(w) for w in words] + [END], pause=0.02))
    elapsed = time.monotonic() - started
    assert pieces == words
    assert 1 <= len(saves) <= elapsed / growing.SAVE_EVERY + 1, (len(saves), elapsed)
    saved = await sync_to_async(lambda: Message.objects.get(pk=reply.pk).content)()
    assert saves[-1][reply.pk] == saved
    assert "".join(words).startswith(saved) and saved


async def test_a_stop_from_elsewhere_ends_the_stream_at_the_next_save() -> None:
    reply = await answer_rows()
    words = [f"w{n} " for n in range(400)]
    body = Reads([event(w) for w in words] + [END], pause=0.01)
    stopping = asyncio.get_running_loop().call_later(
        0.3, lambda: asyncio.ensure_future(sync_to_async(_stop)(reply.reply_to_id))
    )
    started = time.monotonic()
    with pytest.raises(Stopped):
        await relayed(reply, body)
    stopping.cancel()
    assert time.monotonic() - started < 0.3 + 2 * growing.SAVE_EVERY + 1
    assert growing.growing_answers() == 0


def _stop(question_id: int | None) -> None:
    Message.objects.filter(pk=question_id).update(status=Message.Status.CANCELLED)
