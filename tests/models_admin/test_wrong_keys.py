"""A key TabbyAPI refuses is an error that names the setting to fix, everywhere an admin looks: the admin
API answers 502 with `detail` and `reason`, the Models tab's socket carries it, the operator commands
exit non-zero with it. An API key given as the admin key is reported as lacking admin rights (TabbyAPI
lists it only the loaded model, so every other model would look unknown). Chat, which uses the API key,
keeps working.

Two live sites on one live model server: one with a wrong admin key, one with the API key as admin key.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import API_KEY, ROOT, TabbyServer
from tests.models_admin.live import operations, wait_until

TINY = "Tiny-Chat-5M"
LIST_FAILED = "Failed to read the model list from TabbyAPI."
SWITCH_FAILED = "Failed to switch model. Is TabbyAPI available?"
UNLOAD_FAILED = "Failed to unload the model. Is TabbyAPI available?"


@pytest.fixture(scope="module")
def wrong_key_site(tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(tmp_path_factory.mktemp("wrong"), tabby.url, extra_env={"TABBY_ADMIN_KEY": "not-the-admin-key"}) as site:
        yield site


@pytest.fixture(scope="module")
def api_key_site(tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(tmp_path_factory.mktemp("api-key"), tabby.url, extra_env={"TABBY_ADMIN_KEY": API_KEY}) as site:
        yield site


def manage(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "manage.py", *args]
    return subprocess.run(command, cwd=ROOT, env=site.env, capture_output=True, text=True, timeout=120, check=False)


def models_tab_state(site: Site, admin: httpx.Client) -> dict[str, Any]:
    """The first event the Models tab's socket brings: the model's state."""
    headers = {"Cookie": f"session_id={admin.cookies['session_id']}", "Origin": site.url}
    with connect("ws" + site.url.removeprefix("http") + "/ws/models/", additional_headers=headers, open_timeout=10) as socket:
        return dict(json.loads(socket.recv(timeout=10)))


def refused_list(admin: httpx.Client) -> dict[str, Any]:
    response = admin.get("/api/admin/models")
    return dict(response.json()) if response.status_code == 502 else {}


def answered_in_chat(site: Site) -> str:
    """Chat uses the API key: a member's message is answered whatever the admin key."""
    with site.session(MEMBER) as member:
        conversation = member.post("/api/conversations/", json={}).json()["id"]
        url = f"/api/conversations/{conversation}/messages/"
        assert member.post(url, json={"content": "Hello"}).status_code == 202
        messages = wait_until(
            lambda: (found := member.get(url).json())[-1]["role"] == "assistant" and found[-1]["status"] == "done" and found,
            60,
            "the answer",
        )
    return str(messages[-1]["model_name"])


def test_a_wrong_admin_key_is_an_error_naming_the_setting_in_the_api_the_models_tab_and_the_commands(
    wrong_key_site: Site,
) -> None:
    site = wrong_key_site
    fix = f"set TABBY_ADMIN_KEY to the admin_key in the api_tokens.yml of the TabbyAPI at {site.env['TABBY_HOST']}."
    with site.session(ADMIN) as admin:
        refused = wait_until(lambda: refused_list(admin), 10, "GET /api/admin/models to answer 502")
        assert refused["detail"] == LIST_FAILED
        assert refused["reason"] == f"TabbyAPI refused Gantry's admin key (Invalid API key); {fix}"
        state = models_tab_state(site, admin)
        assert (state["trouble"], state["trouble_text"]) == ("key", refused["reason"])

        refreshed = admin.post("/api/admin/models/refresh")
        assert refreshed.status_code == 502 and refreshed.json()["reason"] == refused["reason"]
        switched = admin.post("/api/admin/models/switch", json={"model_id": TINY})
        assert switched.status_code == 502
        assert (switched.json()["detail"], switched.json()["reason"]) == (SWITCH_FAILED, refused["reason"])
        unloaded = admin.post("/api/admin/models/unload")
        assert unloaded.status_code == 502 and unloaded.json()["detail"] == UNLOAD_FAILED
        assert operations(site) == []  # nothing was started that could only fail

    for command in (["sync_models"], ["switch_model", TINY], ["unload_model"]):
        result = manage(site, *command)
        assert result.returncode == 1, (command, result.stdout)
        assert result.stderr == f"CommandError: {refused['reason']}\n", command
    assert answered_in_chat(site) == TINY


def test_an_api_key_given_as_the_admin_key_is_reported_as_lacking_admin_rights(api_key_site: Site, tabby: TabbyServer) -> None:
    site = api_key_site
    lacking = (
        "The admin key Gantry uses is one of TabbyAPI's API keys, without admin rights (TabbyAPI shows it only the loaded "
        "model and refuses its loads and unloads); set TABBY_ADMIN_KEY to the admin_key in the api_tokens.yml of the "
        f"TabbyAPI at {site.env['TABBY_HOST']}."
    )
    with tabby.client(admin=True) as direct:
        others = [card["id"] for card in direct.get("/v1/models").json()["data"] if card["id"] != TINY]
    assert others, "the model server has other models than the loaded one"
    with site.session(ADMIN) as admin:
        refused = wait_until(lambda: refused_list(admin), 10, "GET /api/admin/models to answer 502")
        assert (refused["detail"], refused["reason"]) == (LIST_FAILED, lacking)
        switched = admin.post("/api/admin/models/switch", json={"model_id": others[0]})
        assert switched.status_code == 502, switched.text  # not 404 "There is no model named ..."
        assert switched.json()["reason"] == lacking
        assert models_tab_state(site, admin)["trouble_text"] == lacking
    result = manage(site, "switch_model", others[0])
    assert (result.returncode, result.stderr) == (1, f"CommandError: {lacking}\n")
    assert answered_in_chat(site) == TINY
