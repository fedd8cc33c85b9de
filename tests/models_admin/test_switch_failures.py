"""Switches that go wrong, and the model list following the model server: each ends with a clear message
and a state that agrees with TabbyAPI's `GET /v1/model` (database, admin API, no operation left running).

Three live sites: one on a model server with a broken model folder among good ones, one pointed at a
closed port, and one with a 2-second stall timeout on a model server reading from a simulated slow disk.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import ROOT, TabbyServer, free_port, load_events, run_tabby, wait_loaded
from tests.models_admin.live import backend, disagreement, loaded_model, operations, started_together, wait_until

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
SMALL_V2 = "Small-Chat-200M-v2"  # the same weights in a second folder: a second model that loads as slowly
LARGE = "Large-Chat-1G"
BROKEN = "Broken-Chat"
SWITCH_FAILED = "Failed to switch model. Is TabbyAPI available?"
ONE_CPU_THREAD = {"cpu_threads": 1}


@pytest.fixture(scope="module")
def model_dir(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    for name, source in ((TINY, TINY), (SMALL, SMALL), (SMALL_V2, SMALL)):
        (folder / name).symlink_to(demo_models / source, target_is_directory=True)
    broken = folder / BROKEN
    shutil.copytree(demo_models / TINY, broken)
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 12')  # cut short
    return folder


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TabbyServer, Site]]:
    """The main model server (at 100 MB/s the 200 MB model takes 2 s) and its site, refreshing every second."""
    config = {"model": {"model_name": TINY, "load_throttle_mbps": 100}, "developer": ONE_CPU_THREAD}
    env = {"GANTRY_REFRESH_INTERVAL": "1", "GANTRY_MAX_ANSWER_TOKENS": "16"}
    port = free_port()
    with started_together(
        run_tabby(tmp_path_factory.mktemp("tabby"), model_dir, config=config, port=port),
        run_site(tmp_path_factory.mktemp("site"), f"http://127.0.0.1:{port}", extra_env=env),
    ) as (tabby, site):
        wait_loaded(tabby, TINY)
        yield tabby, site


@pytest.fixture(scope="module")
def tabby(servers: tuple[TabbyServer, Site]) -> TabbyServer:
    return servers[0]


@pytest.fixture(scope="module")
def site(servers: tuple[TabbyServer, Site]) -> Site:
    return servers[1]


@pytest.fixture
def admin(site: Site) -> Iterator[httpx.Client]:
    with site.session(ADMIN) as client:
        yield client


def switch(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/api/admin/models/switch", json={"model_id": model})


def ensure_active(admin: httpx.Client, model: str) -> None:
    response = switch(admin, model)
    assert response.status_code == 200, response.text


def assert_agrees(site: Site, admin: httpx.Client, tabby: TabbyServer | None) -> None:
    problem = disagreement(site, admin, tabby)
    assert problem is None, problem


# The model server reports an error


def test_a_broken_model_folder_fails_the_switch_and_the_previous_model_is_loaded_again(
    site: Site, tabby: TabbyServer, admin: httpx.Client
) -> None:
    ensure_active(admin, TINY)
    response = switch(admin, BROKEN)
    assert response.status_code == 502
    body = response.json()
    assert body["detail"] == SWITCH_FAILED
    assert body["reason"].startswith(f"TabbyAPI could not load {BROKEN}: Failed to load config.json")
    assert body["rolled_back"] is True
    operation = operations(site)[0]
    assert (operation["id"], operation["status"], operation["error_kind"]) == (body["operation_id"], "failed", "failed")
    assert operation["error"] == body["reason"] and operation["rolled_back"]
    assert loaded_model(tabby) == TINY
    assert_agrees(site, admin, tabby)

    with site.session(MEMBER) as member:
        conversation = member.post("/api/conversations/", json={}).json()
        url = f"/api/conversations/{conversation['id']}/messages/"
        assert member.post(url, json={"content": "Are you back?"}).status_code == 202
        answered = wait_until(
            lambda: (
                (messages := member.get(url).json())[-1]["role"] == "assistant" and messages[-1]["status"] == "done" and messages
            ),
            60,
            "the answer after the rollback",
        )
    assert answered[-1]["model_name"] == TINY


# Two switches at once


def test_of_two_switches_at_once_one_is_refused_with_409_and_the_other_succeeds(
    site: Site, tabby: TabbyServer, admin: httpx.Client
) -> None:
    ensure_active(admin, TINY)
    together = threading.Barrier(2)

    def request(model: str) -> httpx.Response:
        together.wait()
        return switch(admin, model)

    with ThreadPoolExecutor(max_workers=2) as pool:
        responses = dict(zip((SMALL, SMALL_V2), pool.map(request, (SMALL, SMALL_V2))))
    statuses = sorted(response.status_code for response in responses.values())
    assert statuses == [200, 409], {model: response.text for model, response in responses.items()}
    winner = next(model for model, response in responses.items() if response.status_code == 200)
    refused = next(response for response in responses.values() if response.status_code == 409)
    assert refused.json()["detail"] == f"Another operation is running (switch to {winner}); try again when it ends."
    assert loaded_model(tabby) == winner
    assert_agrees(site, admin, tabby)


def test_two_switches_to_the_same_model_both_succeed_as_one_operation(
    site: Site, tabby: TabbyServer, admin: httpx.Client
) -> None:
    ensure_active(admin, TINY)
    before = operations(site)[0]["id"]
    together = threading.Barrier(2)

    def request(model: str) -> httpx.Response:
        together.wait()
        return switch(admin, model)

    with ThreadPoolExecutor(max_workers=2) as pool:
        responses = list(pool.map(request, (SMALL, SMALL)))
    assert [response.status_code for response in responses] == [200, 200]
    assert all(response.json() == {"message": f"Model switched to {SMALL}", "model_id": SMALL} for response in responses)
    new = [op for op in operations(site) if op["id"] > before]
    assert [(op["kind"], op["to_model"], op["status"]) for op in new] == [("switch", SMALL, "succeeded")]
    assert_agrees(site, admin, tabby)


# The operator's commands


def manage(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "manage.py", *args]
    return subprocess.run(command, cwd=ROOT, env=site.env, capture_output=True, text=True, timeout=120, check=False)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1, result.stdout
    return result.stdout.strip()


def test_the_management_commands_print_a_one_line_result(site: Site, tabby: TabbyServer, admin: httpx.Client) -> None:
    ensure_active(admin, TINY)
    assert re.fullmatch(rf"Model switched to {SMALL} in \d+\.\d s\.", one_line(manage(site, "switch_model", SMALL)))
    assert loaded_model(tabby) == SMALL
    assert one_line(manage(site, "unload_model")) == "Model unloaded successfully."
    assert loaded_model(tabby) is None
    assert re.fullmatch(r"\d+ models; active: none; state: unloaded\.", one_line(manage(site, "sync_models")))
    assert_agrees(site, admin, tabby)


def test_the_switch_command_fails_with_a_clear_message_for_an_unknown_model(site: Site) -> None:
    before = len(operations(site))
    result = manage(site, "switch_model", "Mistral-7B-Instruct-v0.3")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "CommandError: There is no model named Mistral-7B-Instruct-v0.3.\n"
    assert len(operations(site)) == before


# The model list follows the model server


def listed(admin: httpx.Client) -> dict[str, bool]:
    return {model["id"]: model["active"] for model in admin.get("/api/admin/models").json()["models"]}


def test_a_folder_added_or_removed_shows_in_the_list_after_a_refresh(
    site: Site, model_dir: Path, demo_models: Path, admin: httpx.Client
) -> None:
    added, later = model_dir / "Added-Chat", model_dir / "Added-Later-Chat"
    try:
        added.symlink_to(demo_models / TINY, target_is_directory=True)
        refreshed = admin.post("/api/admin/models/refresh")
        assert refreshed.status_code == 200
        assert "Added-Chat" in {model["id"] for model in refreshed.json()["models"]}
        assert "Added-Chat" in listed(admin)

        # Nobody asks: the periodic refresh (every second here) finds the changes by itself.
        added.unlink()
        later.symlink_to(demo_models / TINY, target_is_directory=True)
        wait_until(lambda: "Added-Later-Chat" in (now := listed(admin)) and "Added-Chat" not in now, 5, "the periodic refresh")
    finally:
        for link in (added, later):
            link.unlink(missing_ok=True)
    assert admin.post("/api/admin/models/refresh").status_code == 200
    assert "Added-Later-Chat" not in listed(admin)


def test_a_model_loaded_on_tabbyapi_directly_becomes_active_within_one_refresh(
    site: Site, tabby: TabbyServer, admin: httpx.Client
) -> None:
    ensure_active(admin, TINY)
    assert load_events(tabby, SMALL)[-1]["status"] == "finished"
    wait_until(lambda: listed(admin).get(SMALL), 5, f"{SMALL} to become active in the list")
    assert_agrees(site, admin, tabby)


# TabbyAPI cannot be reached


@pytest.fixture(scope="module")
def unreachable_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(tmp_path_factory.mktemp("unreachable"), f"http://127.0.0.1:{free_port()}") as site:
        yield site


def test_a_switch_or_unload_while_tabbyapi_is_unreachable_is_502(unreachable_site: Site) -> None:
    site = unreachable_site
    with site.session(ADMIN) as admin:
        response = switch(admin, TINY)
        assert response.status_code == 502
        body = response.json()
        assert body["detail"] == SWITCH_FAILED
        assert "cannot be reached" in body["reason"]
        operation = operations(site)[0]
        assert (operation["id"], operation["status"], operation["error_kind"]) == (body["operation_id"], "failed", "unreachable")
        assert operation["error"] == body["reason"]
        assert backend(site)["state"] == "unreachable"
        assert_agrees(site, admin, None)

        unloaded = admin.post("/api/admin/models/unload")
        assert unloaded.status_code == 502
        assert unloaded.json()["detail"] == "Failed to unload the model. Is TabbyAPI available?"
        assert "cannot be reached" in unloaded.json()["reason"]
        assert_agrees(site, admin, None)


# A load that stops making progress


@pytest.fixture(scope="module")
def stalling(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TabbyServer, Site]]:
    """A model server on a 10 MB/s disk (each module of the 1 GB model takes over 2 s to read) and a site
    with a 2-second stall timeout.

    The server starts with the tiny model, read at full speed. Its 1 GB load would go on for 100 s after
    the test, so the server is killed at the end instead of waited for.
    """
    folder = tmp_path_factory.mktemp("slow-models")
    for name in (TINY, LARGE):
        (folder / name).symlink_to(demo_models / name, target_is_directory=True)
    config = {"model": {"load_throttle_mbps": 10}, "developer": ONE_CPU_THREAD}
    env = {"GANTRY_SWITCH_TIMEOUT": "2", "GANTRY_REFRESH_INTERVAL": "1"}
    port = free_port()
    with started_together(
        run_tabby(tmp_path_factory.mktemp("slow-tabby"), folder, config=config, port=port),
        run_site(tmp_path_factory.mktemp("stalling"), f"http://127.0.0.1:{port}", extra_env=env),
    ) as (slow_tabby, site):
        assert load_events(slow_tabby, TINY, load_throttle_mbps=0)[-1]["status"] == "finished"
        yield slow_tabby, site
        slow_tabby.process.kill()


def test_a_load_that_stops_making_progress_is_504_after_the_stall_timeout(stalling: tuple[TabbyServer, Site]) -> None:
    slow_tabby, site = stalling
    with site.session(ADMIN) as admin:
        wait_until(lambda: listed(admin).get(TINY), 10, f"the site to see {TINY} loaded")
        started = time.monotonic()
        response = switch(admin, LARGE)
        took = time.monotonic() - started
        assert response.status_code == 504
        body = response.json()
        assert body["detail"] == SWITCH_FAILED
        assert body["reason"] == "The model server made no progress for 2 seconds."
        assert 2 <= took < 15
        operation = operations(site)[0]
        assert (operation["id"], operation["status"], operation["error_kind"]) == (body["operation_id"], "failed", "stalled")
        # The model server is still reading the big model, so the previous one could not come back either.
        assert body["rolled_back"] is False
        assert loaded_model(slow_tabby) is None
        assert_agrees(site, admin, slow_tabby)
