"""The chat page's model picker in a real Chromium, with two real model servers holding different models
(the tiny one on the default backend, the small one on a second): the served models, the default first;
a conversation answered by the model picked; the picker and the banner following the fleet live."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from harness.site import ADMIN, MEMBER, Site
from harness.tabby_server import ADMIN_KEY, API_KEY, TabbyServer, run_tabby, wait_loaded
from tests.conftest import TINY
from tests.e2e.conftest import log_in

SMALL = "Small-Chat-200M"
SMALL_SERVER = {"model": {"model_name": SMALL}, "developer": {"cpu_threads": 1}}
ANSWER_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def fleet(site: Site, demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    with run_tabby(tmp_path_factory.mktemp("second"), demo_models, config=SMALL_SERVER) as server:
        wait_loaded(server, SMALL, timeout=120)
        with site.session(ADMIN) as admin:
            added = admin.post("/api/admin/backends", json={"name": "gpu-2", "url": server.url, "api_key": API_KEY, "admin_key": ADMIN_KEY})
            assert added.status_code == 201 and added.json()["backend"]["state"] == "ready", added.text
        try:
            yield server
        finally:
            with site.session(ADMIN) as admin:
                admin.delete("/api/admin/backends/gpu-2/")


def test_a_conversation_picks_the_small_model_and_the_picker_follows_the_fleet_live(page: Page, site: Site, fleet: TabbyServer) -> None:
    log_in(page, MEMBER)
    picker = page.get_by_label("Model for this conversation")
    expect(picker.locator("option")).to_have_text([f"{TINY} (default)", SMALL])
    expect(picker).to_have_value("")

    # Picked before the conversation exists: it is created with that model.
    picker.select_option(SMALL)
    expect(page.locator("#model-name")).to_have_text(SMALL)
    page.get_by_label("Message").fill("Hello there")
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .message.assistant")).to_have_class(re.compile(r"\bdone\b"), timeout=ANSWER_TIMEOUT_MS)
    expect(page).to_have_url(re.compile(r"/c/\d+/$"))
    conversation_id = int(page.url.rstrip("/").split("/")[-1])
    with site.session(MEMBER) as member:
        assert member.get(f"/api/conversations/{conversation_id}/").json()["model"] == SMALL
        answers = [m for m in member.get(f"/api/conversations/{conversation_id}/messages/").json() if m["role"] == "assistant"]
    assert [m["model_name"] for m in answers] == [SMALL]

    # Its backend leaves the rotation: the picker and the banner say so at once, without a reload.
    with site.session(ADMIN) as admin:
        assert admin.post("/api/admin/backends/gpu-2/drain").status_code == 200
        expect(picker.locator("option")).to_have_text([f"{TINY} (default)", f"{SMALL} (not available)"])
        expect(page.locator("#model-banner")).to_have_text("Model not available")
        assert admin.post("/api/admin/backends/gpu-2/resume").status_code == 200
    expect(picker.locator("option")).to_have_text([f"{TINY} (default)", SMALL])
    expect(page.locator("#model-banner")).to_be_hidden()

    # Back to the default: stored, and kept after a reload.
    picker.select_option("")
    expect(page.locator("#model-name")).to_have_text(TINY)
    page.reload()
    expect(page.get_by_label("Model for this conversation")).to_have_value("")
    with site.session(MEMBER) as member:
        assert member.get(f"/api/conversations/{conversation_id}/").json()["model"] is None
