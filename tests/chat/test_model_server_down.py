"""When the model server is down, or dies mid-answer, a message ends `failed` with a sentence, and Retry answers it.

The site talks to a model server of this module's own, on a fixed port, which the tests stop and start.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.site import MEMBER, Site, receive_until, run_site
from harness.tabby_server import free_port, run_tabby, wait_loaded
from tests.conftest import TINY, TINY_SERVER

DOWN = "The model server cannot be reached right now. Your message is kept: press Retry to send it again."


class ModelServer:
    """The tiny model served on one port, stopped and started again by the tests."""

    def __init__(self, workdir: Path, demo_models: Path) -> None:
        self.workdir, self.demo_models = workdir, demo_models
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._running: ExitStack | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._running is not None:
            return
        with ExitStack() as stack:
            server = stack.enter_context(run_tabby(self.workdir, self.demo_models, config=TINY_SERVER, port=self.port))
            wait_loaded(server, TINY)
            self._process, self._running = server.process, stack.pop_all()

    def stop(self) -> None:
        """Stop it the way an operator does (SIGINT, then wait for it to exit)."""
        if self._running is not None:
            self._running.close()
            self._running = None

    def crash(self) -> None:
        """Kill it at once, in the middle of whatever it was doing."""
        if self._running is not None and self._process is not None:
            self._process.kill()
            self._process.wait()
            self.stop()


@pytest.fixture(scope="module")
def model_server(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    server = ModelServer(tmp_path_factory.mktemp("model-server"), demo_models)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def site(model_server: ModelServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A site that has seen the model loaded: a server that goes away later is a failure, not a wait."""
    with run_site(tmp_path_factory.mktemp("site"), model_server.url) as site:
        with site.session(MEMBER) as client:
            asyncio.run(model_seen(site, client))
        yield site


async def model_seen(site: Site, client: httpx.Client) -> None:
    async with site.socket("/ws/chat/", client) as socket:
        await receive_until(socket, lambda e: e["type"] == "model.state" and e["state"] == "ready")


def messages_of(client: httpx.Client, conversation_id: int) -> list[dict[str, Any]]:
    return list(client.get(f"/api/conversations/{conversation_id}/messages/").json())


def answered(client: httpx.Client, conversation_id: int, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        messages = messages_of(client, conversation_id)
        if messages and all(m["status"] in ("done", "failed", "cancelled") for m in messages):
            return messages
        assert time.monotonic() < deadline, messages
        time.sleep(0.1)


def ended(question_id: int) -> Callable[[dict[str, Any]], bool]:
    """Matches the last event of an answer: its question's final state."""
    return lambda e: (
        e["type"] == "chat.message" and e["message"]["id"] == question_id and e["message"]["status"] in ("done", "failed")
    )


async def test_a_message_sent_while_the_model_server_is_down_fails_with_a_sentence_and_retry_answers_it(
    site: Site, model_server: ModelServer
) -> None:
    model_server.stop()
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
            question = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Anyone there?"}).json()
            events = await receive_until(socket, ended(question["id"]))
        failed = messages_of(client, conversation["id"])
        model_server.start()
        retried = client.post(f"/api/messages/{question['id']}/retry/")
        after = answered(client, conversation["id"])
    errors = [e for e in events if e["type"] == "chat.error"]
    assert errors == [{"type": "chat.error", "message_id": question["id"], "detail": DOWN}]
    asked = failed[0]
    assert (asked["id"], asked["content"], asked["status"], asked["error"]) == (question["id"], "Anyone there?", "failed", DOWN)
    assert "generating" not in [m["status"] for m in failed]
    assert retried.status_code == 202
    assert [(m["role"], m["status"]) for m in after] == [("user", "done"), ("assistant", "done")]
    assert after[0]["error"] == "" and after[1]["content"]


async def test_the_model_server_dying_mid_answer_leaves_the_message_failed_and_retry_answers_it(
    site: Site, model_server: ModelServer
) -> None:
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
            # The tiny model sometimes ends an answer at once; then the server is back up and we ask again.
            for _ in range(3):
                await asyncio.to_thread(model_server.start)  # off the loop: the socket keeps answering pings
                question = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "Go on"}).json()
                events = await receive_until(socket, lambda e: e["type"] == "chat.token")
                await asyncio.to_thread(model_server.crash)
                events += await receive_until(socket, ended(question["id"]))
                if events[-1]["message"]["status"] == "failed":
                    break
            else:
                raise AssertionError("Every answer was complete before the model server died.")
        failed = messages_of(client, conversation["id"])
        model_server.start()
        retried = client.post(f"/api/messages/{question['id']}/retry/")
        after = answered(client, conversation["id"])
    asked, answer = failed[-2:]
    streamed = "".join(e["text"] for e in events if e["type"] == "chat.token" and e["message_id"] == answer["id"])
    assert (asked["id"], asked["status"]) == (question["id"], "failed")
    assert asked["error"].endswith("press Retry to send it again.") and "Traceback" not in asked["error"]
    assert (answer["status"], answer["content"]) == ("failed", streamed)  # what came before the failure is kept
    assert "generating" not in [m["status"] for m in failed]
    assert retried.status_code == 202
    assert [(m["role"], m["status"]) for m in after[-2:]] == [("user", "done"), ("assistant", "done")]
