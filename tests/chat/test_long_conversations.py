"""A conversation longer than the model's context keeps working: its oldest turns are left out."""

from __future__ import annotations

import time
from typing import Any

import httpx

from harness.site import MEMBER, Site


def answered(client: httpx.Client, conversation_id: int, question_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        messages = client.get(f"/api/conversations/{conversation_id}/messages/").json()
        question = next(m for m in messages if m["id"] == question_id)
        if question["status"] in ("done", "failed"):
            return question
        time.sleep(0.2)
    raise AssertionError(f"message {question_id} was not answered: {question}")


def test_a_conversation_past_the_context_drops_its_oldest_turns(site: Site) -> None:
    # Each message alone fits the tiny model's 2048 tokens; two of them with an answer do not.
    long_text = "a fairly long sentence about python modules and packages. " * 90
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        for _ in range(3):
            posted = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": long_text}).json()
            assert answered(client, conversation["id"], posted["id"])["status"] == "done"


def test_a_single_message_longer_than_the_context_fails_with_a_sentence(site: Site) -> None:
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        text = "many different words in a very long message " * 400
        posted = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": text}).json()
        question = answered(client, conversation["id"], posted["id"])
    assert question["status"] == "failed"
    assert question["error"].startswith("This message is too long for the model")
    assert "..)" not in question["error"] and ".)" not in question["error"]
