"""Swap on request, against the real model server and the real site: a request naming a model no backend
holds has it loaded when the model's `load_on_request` lets the caller (audited with the source `request`
and the user), a streamed one hearing the load's progress; a caller the policy leaves out gets 403 and an
unknown model 404, and nothing loads; a pinned model is never unloaded for another model's requests (they
wait). Four clients alternating between two models on one backend are all answered with few loads, none
waiting longer than GANTRY_MAX_SWAP_WAIT plus a load.

The model server reads weights at 80 MB/s, so the 200 MB model's load lasts a few seconds (its progress is
seen) and the 5 MB model's a moment. The scheduler's choices themselves are tested in
tests/models_admin/test_swap_scheduler.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from harness.site import ADMIN, MEMBER, OUTSIDER, Site
from harness.tabby_server import TabbyServer
from tests.gateway.live import make_key, site_loading_on_request
from tests.models_admin.live import backend, query, wait_until

TINY, SMALL, LARGE = "Tiny-Chat-5M", "Small-Chat-200M", "Large-Chat-1G"
MAX_SWAP_WAIT = 3.0
SPACING = 0.5  # seconds between two requests of the forty: a pace one backend keeps up with (see the test)
ASK = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def servers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TabbyServer, Site]]:
    env = {"GANTRY_MAX_SWAP_WAIT": str(MAX_SWAP_WAIT)}
    with site_loading_on_request(tmp_path_factory.mktemp("swap"), demo_models, (TINY, SMALL), env) as servers:
        yield servers


def set_policy(site: Site, model: str, **policy: Any) -> None:
    with site.session(ADMIN) as admin:
        response = admin.put(f"/api/admin/models/{model}/settings", json=policy)
        assert response.status_code == 200, response.text


def request_loads(site: Site) -> list[dict[str, Any]]:
    return query(
        site,
        "SELECT o.id, o.kind, o.status, o.from_model, o.to_model, o.started, o.finished, u.username "
        "FROM models_admin_operation o LEFT JOIN auth_user u ON u.id = o.requested_by_id WHERE o.source = 'request' ORDER BY o.id",
    )


def stream(site: Site, key: str, model: str, timeout: float = 120) -> tuple[int, list[str]]:
    headers = {"Authorization": f"Bearer {key}"}
    body = {**ASK, "model": model, "stream": True}
    with httpx.stream("POST", site.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout) as response:
        return response.status_code, [line for line in response.iter_lines() if line]


def answered_by(lines: list[str]) -> set[str]:
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]), lines
    return {chunk["model"] for chunk in chunks}


def test_an_unknown_model_is_404_and_a_caller_the_policy_leaves_out_403_and_nothing_loads(
    servers: tuple[TabbyServer, Site],
) -> None:
    _, site = servers
    key = make_key(site, MEMBER)[1]
    client = openai.OpenAI(base_url=site.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="Nope-7B", **ASK)  # type: ignore[call-overload]
    error = unknown.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("There is no model named Nope-7B on any model server.")
    # Large-Chat-1G keeps the default policy: only admins' requests load it.
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        client.chat.completions.create(model=LARGE, stream=True, **ASK)  # type: ignore[call-overload]
    error = forbidden.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_loadable"
    assert "only an admin's request may have it loaded (its load_on_request policy is admins)" in error["message"]
    time.sleep(1.5)  # a watcher's round or more: nothing was left waiting to be loaded
    assert request_loads(site) == []
    assert (backend(site)["state"], backend(site)["active_model"]) == ("ready", TINY)


def test_a_streamed_request_loads_its_model_hears_the_progress_and_is_audited(servers: tuple[TabbyServer, Site]) -> None:
    _, site = servers
    key = make_key(site, OUTSIDER)[1]
    status, lines = stream(site, key, SMALL)
    assert status == 200
    comments = [line for line in lines if line.startswith(":")]
    percents = [
        int(m.group(1)) for line in comments if (m := re.fullmatch(r": loading Small-Chat-200M (\d+)%, no requests ahead", line))
    ]
    assert len(percents) >= 2 and percents == sorted(percents) and percents[-1] > percents[0], comments
    assert lines[-1] == "data: [DONE]" and answered_by(lines) == {SMALL}
    [load] = request_loads(site)
    assert (load["kind"], load["status"], load["from_model"], load["to_model"], load["username"]) == (
        "switch",
        "succeeded",
        TINY,
        SMALL,
        OUTSIDER[0],
    )
    assert (backend(site)["state"], backend(site)["active_model"]) == ("ready", SMALL)
    with site.session(ADMIN) as admin:
        assert 'outsider <span class="via">(a request for the model)</span>' in admin.get("/admin/activity/").text


def test_a_pinned_model_is_not_unloaded_for_another_models_requests(servers: tuple[TabbyServer, Site]) -> None:
    _, site = servers
    assert backend(site)["active_model"] == SMALL
    set_policy(site, SMALL, load_on_request="everyone", pinned=True)
    loads = len(request_loads(site))
    key = make_key(site, MEMBER)[1]
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(stream, site, key, TINY)
        time.sleep(MAX_SWAP_WAIT + 3)  # past the grouping bound, and Small is idle: only the pin keeps it
        assert not waiting.done()
        assert len(request_loads(site)) == loads and backend(site)["active_model"] == SMALL
        set_policy(site, SMALL, load_on_request="everyone")  # unpinned: the waiting request loads its model
        status, lines = waiting.result(timeout=120)
    assert status == 200 and answered_by(lines) == {TINY}
    assert [row["to_model"] for row in request_loads(site)[loads:]] == [TINY]


async def one_request(client: openai.AsyncOpenAI, model: str, at: float, start: float) -> tuple[str, float, str]:
    """Send at `at` seconds after `start`; return the model asked, the time to the first token, the model
    that answered."""
    await asyncio.sleep(max(0.0, start + at - time.monotonic()))
    sent = time.monotonic()
    first, answered = None, ""
    stream = await client.chat.completions.create(model=model, stream=True, **ASK)  # type: ignore[call-overload]
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - sent
        answered = chunk.model
    assert first is not None, f"no text answered the request for {model}"
    return model, first, answered


async def forty_requests(site: Site, keys: list[str]) -> list[tuple[str, float, str]]:
    """Four clients, each alternating between the two models, one request every SPACING seconds in all,
    in turns of four (clients 0 1 2 3, then 1 0 3 2): in arrival order the model changes at every request."""
    clients = [openai.AsyncOpenAI(base_url=site.url + "/v1", api_key=key, max_retries=0, timeout=120) for key in keys]
    start = time.monotonic()
    tasks = []
    for index in range(40):
        turn, place = divmod(index, 4)
        client = clients[place ^ (turn % 2)]
        tasks.append(one_request(client, (TINY, SMALL)[index % 2], index * SPACING, start))
    try:
        return await asyncio.gather(*tasks)
    finally:
        for client in clients:
            await client.close()


def test_four_clients_alternating_between_two_models_are_all_answered_with_few_loads(servers: tuple[TabbyServer, Site]) -> None:
    """At a pace the backend keeps up with: requests held beyond GANTRY_MAX_CONCURRENT_GENERATIONS for one
    model would wait for answers to end, which no scheduling of swaps shortens."""
    _, site = servers
    wait_until(lambda: backend(site)["state"] == "ready", 60, "the backend to be ready")
    before = len(request_loads(site))
    keys = [make_key(site, user, name=f"client {n}")[1] for n, user in enumerate((MEMBER, OUTSIDER, MEMBER, OUTSIDER))]
    results = asyncio.run(forty_requests(site, keys))
    assert [asked for asked, _, answered in results if asked != answered] == []  # each answered by its model
    changes = sum(1 for a, b in itertools.pairwise(results) if a[0] != b[0])
    loads = request_loads(site)[before:]
    assert all(load["status"] == "succeeded" for load in loads), loads
    assert 1 <= len(loads) <= changes / 4, (len(loads), changes)
    longest_load = max(seconds(load) for load in loads)
    slowest = max(first for _, first, _ in results)
    # The bound and one load (its drain and unload included), with two seconds for the watchers' round
    # (a second) and the model's own first token on this shared CPU.
    assert slowest <= MAX_SWAP_WAIT + longest_load + 2.0, (slowest, longest_load, [round(first, 2) for _, first, _ in results])


def seconds(load: dict[str, Any]) -> float:
    return (datetime.fromisoformat(load["finished"]) - datetime.fromisoformat(load["started"])).total_seconds()
