"""After a switch stops waiting for a load that made no progress, TabbyAPI goes on with that load and
holds its load lock (it does not stop a load whose client gave up). Gantry follows the load to its end:
meanwhile a new switch or unload gets 409 with a sentence saying why (instead of stalling behind it),
held messages wait, and the state afterwards is what TabbyAPI's `GET /v1/model` says.

A model server on a simulated 12 MB/s disk: each module of the 200 MB model takes up to 1.4 s to read,
so a site with a one-second stall timeout gives up on it, while the whole load ends about 17 s later.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import TabbyServer, free_port, load_events, run_tabby
from tests.models_admin.live import backend, disagreement, loaded_model, operations, started_together, wait_until

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
SWITCH_FAILED = "Failed to switch model. Is TabbyAPI available?"


@pytest.fixture(scope="module")
def servers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TabbyServer, Site]]:
    folder = tmp_path_factory.mktemp("models")
    for name in (TINY, SMALL):
        (folder / name).symlink_to(demo_models / name, target_is_directory=True)
    config = {"model": {"load_throttle_mbps": 12}, "developer": {"cpu_threads": 1}}
    env = {"GANTRY_SWITCH_TIMEOUT": "1", "GANTRY_MAX_ANSWER_TOKENS": "8"}
    port = free_port()
    with started_together(
        run_tabby(tmp_path_factory.mktemp("tabby"), folder, config=config, port=port),
        run_site(tmp_path_factory.mktemp("site"), f"http://127.0.0.1:{port}", extra_env=env),
    ) as (tabby, site):
        assert load_events(tabby, TINY, load_throttle_mbps=0)[-1]["status"] == "finished"
        yield tabby, site


@pytest.fixture
def admin(servers: tuple[TabbyServer, Site]) -> Iterator[httpx.Client]:
    with servers[1].session(ADMIN) as client:
        yield client


def switch(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/api/admin/models/switch", json={"model_id": model}, timeout=120)


def test_after_a_stall_gantry_follows_the_load_refuses_new_switches_and_ends_agreeing_with_tabbyapi(
    servers: tuple[TabbyServer, Site], admin: httpx.Client
) -> None:
    tabby, site = servers
    wait_until(lambda: backend(site)["active_model"] == TINY, 10, f"the site to see {TINY}, loaded directly on TabbyAPI")
    loads_of_tiny = tabby.log().count(f"Loading {TINY}")

    stalled = switch(admin, SMALL)
    assert stalled.status_code == 504, stalled.text
    body = stalled.json()
    assert (body["detail"], body["reason"], body["rolled_back"]) == (SWITCH_FAILED, "The model server made no progress for 1 second.", False)
    assert loaded_model(tabby) is None  # TabbyAPI is still loading
    row = backend(site)
    assert (row["state"], row["active_model"], row["operation_id"]) == ("unloaded", "", None)
    assert operations(site)[0]["status"] == "failed"

    # While TabbyAPI goes on loading, no switch or unload is started behind that load.
    before = len(operations(site))
    refused = switch(admin, TINY)
    assert refused.status_code == 409
    assert refused.json()["detail"].startswith(f"TabbyAPI is still loading {SMALL}, which a switch stopped waiting for at ")
    assert "cannot switch models before it ends: try again then" in refused.json()["detail"]
    unload = admin.post("/api/admin/models/unload")
    assert unload.status_code == 409 and "cannot unload a model before it ends" in unload.json()["detail"]
    assert len(operations(site)) == before
    with site.session(MEMBER) as member:
        conversation = member.post("/api/conversations/", json={}).json()["id"]
        url = f"/api/conversations/{conversation}/messages/"
        question = member.post(url, json={"content": "Waiting for the new model"}).json()
        assert question["status"] == "queued"

        deadline = time.monotonic() + 120
        while loaded_model(tabby) != SMALL:
            assert time.monotonic() < deadline, "TabbyAPI never finished the load"
            assert backend(site)["state"] != "ready", "the site said ready before TabbyAPI had the model"
            time.sleep(0.05)
        loaded_at = time.monotonic()
        wait_until(lambda: backend(site)["state"] == "ready", 5, "the site to see the model the load ended with")
        assert time.monotonic() - loaded_at < 2.0
        answered = wait_until(
            lambda: (messages := member.get(url).json())[-1]["role"] == "assistant" and messages[-1]["status"] == "done" and messages,
            60,
            "the held message's answer",
        )
    assert answered[-1]["model_name"] == SMALL
    assert backend(site)["active_model"] == SMALL
    assert disagreement(site, admin, tabby) is None
    assert tabby.log().count(f"Loading {TINY}") == loads_of_tiny, "no load was sent behind the stalled one"

    # Once the load has ended, switching works again.
    assert switch(admin, TINY).status_code == 200
    assert loaded_model(tabby) == TINY
    assert disagreement(site, admin, tabby) is None
