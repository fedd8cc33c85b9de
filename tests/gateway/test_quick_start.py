"""An API request whose key this process found valid moments ago, for a model one backend alone served
then, has its answer's request sent from the event loop at once, before any database work; `begin` then
checks everything in the database: it keeps the request, sends it again (other settings, another
backend), or withdraws it (a key revoked meanwhile) before anything of its answer is shown. The model
servers are faked at the one HTTP seam (httpx's MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.contrib.auth.models import User

from gateway import exchange, keys
from gateway.exchange import begin, quick_start
from gateway.keys import create_key
from gateway.openai_input import ApiError, chat_request
from models_admin.models import Backend, ModelSettings
from tests.chat.test_early_request import Servers, closed, faked_servers

pytestmark = pytest.mark.django_db

BODY = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "stream": True}).encode()


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> Servers:
    return faked_servers(monkeypatch)


@pytest.fixture(autouse=True)
def nothing_trusted() -> Iterator[None]:
    keys._found_valid.clear()
    exchange._recent.clear()
    yield
    keys._found_valid.clear()
    exchange._recent.clear()


@pytest.fixture
def key() -> str:
    Backend.objects.update_or_create(
        name="default",
        defaults={"base_url": "http://model-server.test", "state": "ready", "active_model": "Tiny-Chat-5M", "desired_model": "Tiny-Chat-5M"},
    )
    return create_key(User.objects.create_user("alice", password="pw-alice-123"), "laptop")[1]


def first_request(key: str, servers: Servers) -> None:
    """A request answered the usual way: the key looked up, then the request sent; it is done with."""
    early = exchange.EarlyRequest()
    begin(key, BODY, chat_request, early)
    servers.bodies_of(1)
    early.close()
    assert closed(servers.stream(0))


def test_the_next_request_goes_out_before_any_database_work_and_is_kept(
    key: str, servers: Servers, django_assert_num_queries: Any
) -> None:
    early = exchange.EarlyRequest()
    assert quick_start(key, BODY, chat_request, early) is None  # nothing known of this key yet
    first_request(key, servers)
    early = exchange.EarlyRequest()
    with django_assert_num_queries(0):
        sent = quick_start(key, BODY, chat_request, early)
    assert sent is not None
    assert len(servers.bodies_of(2)) == 2  # on its way before the key is looked up again
    begun = begin(key, BODY, chat_request, early, sent)
    assert begun.conversation.owner.username == "alice"
    assert not servers.stream(1).closed.wait(0.3)  # kept: it was right
    assert len(servers.sent) == 2
    early.close()
    assert closed(servers.stream(1))


def test_a_key_revoked_meanwhile_is_refused_and_its_request_withdrawn(key: str, servers: Servers) -> None:
    first_request(key, servers)
    keys.ApiKey.objects.all().delete()  # as another process revokes it: this one still trusts the key
    early = exchange.EarlyRequest()
    sent = quick_start(key, BODY, chat_request, early)
    assert sent is not None
    servers.bodies_of(2)
    with pytest.raises(ApiError) as refused:
        begin(key, BODY, chat_request, early, sent)
    assert refused.value.status == 401
    assert closed(servers.stream(1))
    assert quick_start(key, BODY, chat_request, exchange.EarlyRequest()) is None  # no longer trusted here


def test_settings_changed_meanwhile_send_the_request_again_with_them(key: str, servers: Servers) -> None:
    first_request(key, servers)
    ModelSettings.objects.create(model_name="Tiny-Chat-5M", values={"temperature": 0.25})
    early = exchange.EarlyRequest()
    sent = quick_start(key, BODY, chat_request, early)
    assert sent is not None
    begin(key, BODY, chat_request, early, sent)
    bodies = servers.bodies_of(3)
    assert "temperature" not in bodies[1] and bodies[2]["temperature"] == 0.25
    assert closed(servers.stream(1))  # the one sent on trust ends unseen
    assert not servers.stream(2).closed.wait(0.3)
    early.close()
    assert closed(servers.stream(2))


def test_a_request_whose_caller_went_away_is_not_sent_later(key: str, servers: Servers) -> None:
    early = exchange.EarlyRequest()
    early.close()  # the caller went away while the key was being looked up
    begin(key, BODY, chat_request, early)
    with servers.arrival:
        assert not servers.arrival.wait_for(lambda: servers.sent, 0.5)
