"""An answer's request sent before its question is saved, on a guess of its backend (an API request,
before its conversation is written): the claim keeps it when it picks the same backend holding the same
model, else withdraws it (its generation ends unseen, its connection closed) and sends it where it
belongs, or nowhere. The model servers are faked at the one HTTP seam (httpx's MockTransport)."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from chat import streaming
from chat.balance import likely, model_for, pick
from chat.early import EarlyRequest
from chat.streaming import Prompt
from models_admin.models import Backend
from models_admin.tabby_client import TabbyClient, TabbyConfig

SETTLED = 10.0  # seconds a closed request may take to be seen closed (the generation runs on another thread)


class Held(httpx.AsyncByteStream):
    """An answer's stream that sends nothing until it is closed (the request withdrawn)."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b""

    async def aclose(self) -> None:
        self.closed.set()


class Servers:
    """Each request the model servers were sent: the backend's host and the answer's stream."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Held]] = []
        self.bodies: list[dict[str, Any]] = []
        self.arrival = threading.Condition()

    def answer(self, request: httpx.Request) -> httpx.Response:
        held = Held()
        with self.arrival:
            self.sent.append((request.url.host, held))
            self.bodies.append(json.loads(request.content))
            self.arrival.notify_all()
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=held)

    def hosts(self, count: int) -> list[str]:
        """The hosts of the requests sent so far, once at least `count` have arrived."""
        with self.arrival:
            assert self.arrival.wait_for(lambda: len(self.sent) >= count, SETTLED), self.sent
        return [host for host, _ in self.sent]

    def bodies_of(self, count: int) -> list[dict[str, Any]]:
        """The bodies of the requests sent so far, once at least `count` have arrived."""
        self.hosts(count)
        return list(self.bodies)

    def stream(self, n: int) -> Held:
        return self.sent[n][1]


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> Servers:
    return faked_servers(monkeypatch)


def faked_servers(monkeypatch: pytest.MonkeyPatch) -> Servers:
    """Every backend's model server, faked: answers' requests are recorded and held open."""
    fake = Servers()

    def client(backend: Backend | None = None) -> TabbyClient:
        assert backend is not None
        config = TabbyConfig(base_url=backend.base_url, api_key="test-api-key", admin_key="test-admin-key")
        return TabbyClient(config, transport=httpx.MockTransport(fake.answer))

    monkeypatch.setattr(streaming, "answer_client", client)
    return fake


def backend(pk: int, model: str = "Tiny-Chat-5M") -> Backend:
    return Backend(pk=pk, name=f"b{pk}", base_url=f"http://b{pk}.test", active_model=model)


def prompt_for(chosen: Backend) -> Prompt:
    return Prompt(turns=[{"role": "user", "content": "Hello"}])


def closed(held: Held) -> bool:
    return held.closed.wait(SETTLED)


def test_a_right_guess_is_kept(servers: Servers) -> None:
    early = EarlyRequest()
    early.send(prompt_for(backend(1)), then=lambda: None, backend=backend(1))
    early.to(backend(1), prompt_for, then=lambda: None)
    assert servers.hosts(1) == ["b1.test"]
    assert not servers.stream(0).closed.wait(0.3)  # still on its way
    early.withdraw()
    assert closed(servers.stream(0))
    assert servers.hosts(1) == ["b1.test"]


@pytest.mark.parametrize("claimed", [backend(2), backend(1, "Small-Chat-200M")])
def test_a_wrong_guess_is_withdrawn_and_the_request_sent_where_the_claim_says(servers: Servers, claimed: Backend) -> None:
    early = EarlyRequest()
    early.send(prompt_for(backend(1)), then=lambda: None, backend=backend(1))
    early.to(claimed, prompt_for, then=lambda: None)
    assert servers.hosts(2) == ["b1.test", f"{claimed.name}.test"]
    assert closed(servers.stream(0))  # the guessed request ends unseen
    assert not servers.stream(1).closed.wait(0.3)
    early.withdraw()
    assert closed(servers.stream(1))


def test_a_guess_for_a_message_that_is_held_is_withdrawn(servers: Servers) -> None:
    early = EarlyRequest()
    early.send(prompt_for(backend(1)), then=lambda: None, backend=backend(1))
    early.to(None, prompt_for, then=lambda: None)
    assert servers.hosts(1) == ["b1.test"]
    assert closed(servers.stream(0))
    assert servers.hosts(1) == ["b1.test"] and early.backend is None


def test_rows_saved_after_the_caller_went_away_change_nothing(servers: Servers) -> None:
    early = EarlyRequest()
    early.send(prompt_for(backend(1)), then=lambda: None, backend=backend(1))
    early.withdraw()  # the API request's caller went away while its question was being saved
    answer: Any = object()
    early.saved(answer)  # the first word stands: the generation never sees these rows
    assert servers.hosts(1) == ["b1.test"]
    assert closed(servers.stream(0))


def test_without_a_guess_the_claim_sends_it(servers: Servers) -> None:
    early = EarlyRequest()
    early.to(backend(3), prompt_for, then=lambda: None)
    assert servers.hosts(1) == ["b3.test"]
    early.withdraw()
    assert closed(servers.stream(0))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("default_state", "default_active", "guessed"),
    [
        ("ready", "Tiny-Chat-5M", "default"),  # the default backend holds the default model: the first of equals
        ("switching", "", "second"),  # during its switch to Tiny, the other backend holding Tiny answers
        ("ready", "Small-Chat-200M", "default"),  # the default model is what the default backend holds
    ],
)
def test_the_guess_for_the_default_model_is_read_in_one_statement_as_the_claim_reads_it(
    default_state: str, default_active: str, guessed: str, django_assert_num_queries: Any
) -> None:
    Backend.objects.create(name="default", base_url="http://a", state=default_state, active_model=default_active, desired_model="Tiny-Chat-5M")
    Backend.objects.create(name="second", base_url="http://b", state="ready", active_model="Tiny-Chat-5M")
    Backend.objects.create(name="third", base_url="http://c", state="ready", active_model="Small-Chat-200M")
    with django_assert_num_queries(1):
        chosen = likely("")
    assert chosen is not None and chosen.name == guessed
    assert pick(model_for("")) == chosen  # what the claim picks
    assert likely("Small-Chat-200M") == pick("Small-Chat-200M") is not None
    assert likely("Large-Chat-1G") is None
