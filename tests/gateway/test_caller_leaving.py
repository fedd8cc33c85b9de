"""A caller who goes away while its request is being read or posted (the work of a web thread, which
runs to its end) leaves nothing behind: the conversation that work wrote is discarded once it is done,
and no answer's request goes out for it. The model servers are faked at the one HTTP seam."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from chat.models import Conversation, Message
from gateway import exchange
from gateway.openai_input import chat_request
from tests.chat.test_early_request import Servers
from tests.gateway.test_quick_start import BODY, key, nothing_trusted, servers

__all__ = ["key", "nothing_trusted", "servers"]  # the fixtures of the quick start's tests

pytestmark = pytest.mark.django_db(transaction=True)


def rows() -> tuple[int, int]:
    return Conversation.objects.count(), Message.objects.count()


@pytest.mark.parametrize("step", ["begin", "_post"])
async def test_a_caller_leaving_while_a_web_thread_works_for_it_leaves_no_rows(
    step: str, key: str, servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, go_on = threading.Event(), threading.Event()
    work = getattr(exchange, step)

    def held_back(*args: Any) -> Any:
        entered.set()
        assert go_on.wait(5)
        return work(*args)

    monkeypatch.setattr(exchange, step, held_back)
    request = exchange.Exchange()
    opening = asyncio.create_task(request.open(key, BODY, chat_request))
    assert await asyncio.to_thread(entered.wait, 5)
    opening.cancel()  # the caller went away, as the view is cancelled then
    with pytest.raises(asyncio.CancelledError):
        await opening
    leaving = request.close()
    go_on.set()
    await asyncio.wait_for(asyncio.wrap_future(leaving), 10)
    assert request.step is not None and request.step.exception() is None  # it ran to its end: it wrote its rows
    assert await sync_to_async(rows)() == (0, 0)
    if step == "begin":
        with servers.arrival:
            assert not servers.arrival.wait_for(lambda: servers.sent, 0.5)  # nor was its request sent
