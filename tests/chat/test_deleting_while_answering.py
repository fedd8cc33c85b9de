"""A conversation deleted while its answer streams (another tab, or the page's own Delete): the answer
ends quietly, with nothing saved and no error in the site's log, and the site goes on answering."""

from __future__ import annotations

import time
from typing import Any

import httpx

from harness.site import MEMBER, Site, receive_until


async def answer_streaming(site: Site, client: httpx.Client) -> tuple[dict[str, Any], Any] | None:
    """A new conversation whose answer has sent its first token (None when the tiny model ended it first)."""
    conversation = client.post("/api/conversations/", json={}).json()
    async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
        client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Tell me a long story"})
        first = (await receive_until(socket, lambda e: e["type"] in {"chat.token", "chat.done"}))[-1]
        if first["type"] == "chat.done":
            return None
        deleted = client.delete(f"/api/conversations/{conversation['id']}/")
        assert deleted.status_code == 204
        return conversation, first["message_id"]


async def test_deleting_a_conversation_while_its_answer_streams_ends_the_answer_quietly(site: Site) -> None:
    log_before = len(site.log())
    deleted = []
    with site.session(MEMBER) as client:
        while len(deleted) < 12:
            if (streaming := await answer_streaming(site, client)) is not None:
                deleted.append(streaming)
        # A message answered afterwards: the answers cut off by the deletions have all ended by then.
        conversation = client.post("/api/conversations/", json={}).json()
        client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Hello"})
        deadline = time.monotonic() + 60
        while [m["status"] for m in client.get(f"/api/conversations/{conversation['id']}/messages/").json()] != ["done", "done"]:
            assert time.monotonic() < deadline, "the next message was not answered"
            time.sleep(0.1)
        gone = [client.get(f"/api/conversations/{c['id']}/messages/").status_code for c, _ in deleted]
    assert gone == [404] * 12
    log = site.log()[log_before:]
    assert "Traceback" not in log and "DatabaseError" not in log, log[-3000:]
