"""A message posted through the API is answered by the real model server and saved."""

from __future__ import annotations

import time
from typing import Any

import httpx

from harness.site import MEMBER, Site


def asked(client: httpx.Client) -> list[dict[str, Any]]:
    """A new conversation's "Hello" and its answer, once the answer is saved."""
    conversation = client.post("/api/conversations/", json={}).json()
    posted = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Hello"})
    assert posted.status_code == 202
    assert posted.json()["status"] == "generating"  # the model is ready: answered at once
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        messages: list[dict[str, Any]] = client.get(f"/api/conversations/{conversation['id']}/messages/").json()
        if messages[-1]["role"] == "assistant" and messages[-1]["status"] == "done":
            return messages
        time.sleep(0.2)
    raise AssertionError(f"no answer within 60 s: {messages}")


def test_a_posted_message_gets_a_saved_answer(site: Site) -> None:
    with site.session(MEMBER) as client:
        for _ in range(3):  # the tiny model's random weights now and then end an answer at its first token
            question, answer = asked(client)
            if answer["content"]:
                break
    assert question["status"] == "done" and question["content"] == "Hello"
    assert answer["content"] and answer["reply_to"] == question["id"]
    assert answer["model_name"] == "Tiny-Chat-5M"
