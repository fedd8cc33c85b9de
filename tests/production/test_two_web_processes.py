"""Production mode: two daphne processes meeting in Redis (channel layer) and PostgreSQL."""

from __future__ import annotations

import json
import time
from typing import Any

from websockets.sync.client import connect

from harness.site import MEMBER
from tests.production.conftest import ProductionSite


def socket_url(http_url: str, path: str) -> str:
    return http_url.replace("http://", "ws://") + path


def test_an_answer_made_in_one_process_reaches_a_page_connected_to_the_other(production: ProductionSite) -> None:
    site = production.site
    with site.session(MEMBER) as client:
        conversation = client.get("/api/conversations/").json()
        conversation = client.post("/api/conversations/", json={"title": "Across processes"}).json()
        cookie = f"session_id={client.cookies['session_id']}"
        path = f"/ws/chat/{conversation['id']}/"
        headers = {"Cookie": cookie, "Origin": production.other_url}
        events: list[dict[str, Any]] = []
        with connect(socket_url(production.other_url, path), additional_headers=headers, open_timeout=10) as socket:
            assert json.loads(socket.recv(timeout=10))["type"] == "model.state"
            # Posted to the first process, which generates the answer; the page is on the second.
            posted = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Hi there"})
            assert posted.status_code == 202
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                event = json.loads(socket.recv(timeout=30))
                events.append(event)
                if event["type"] == "chat.done":
                    break
        saved = client.get(f"/api/conversations/{conversation['id']}/messages/").json()
    tokens = [e["text"] for e in events if e["type"] == "chat.token"]
    assert len(tokens) >= 2
    done = events[-1]
    assert {k: done[k] for k in ("type", "message_id", "status")} == {"type": "chat.done", "message_id": saved[-1]["id"], "status": "done"}
    assert done["finish_reason"] in ("stop", "length") and done["usage"]["completion_tokens"] > 0
    assert saved[-1]["content"] == "".join(tokens)
