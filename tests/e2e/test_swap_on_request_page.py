"""Swap on request from the chat page, in a real Chromium: the model picker offers the served models, then
those the user may have loaded by asking (marked so); a conversation that picked one and sends a message
has it loaded, the banner showing the load's progress, and the answer arrives from that model.

The module's own model server (it is swapped) reads weights at 80 MB/s: the 200 MB model's load lasts a
few seconds, long enough to see its progress.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from harness.site import MEMBER, Site
from tests.conftest import TINY
from tests.e2e.conftest import log_in
from tests.gateway.live import site_loading_on_request

SMALL = "Small-Chat-200M"
ANSWER_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def site(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    env = {"GANTRY_MAX_ANSWER_TOKENS": "8"}
    with site_loading_on_request(tmp_path_factory.mktemp("swap"), demo_models, (SMALL,), env) as (_, site):
        yield site


def test_picking_a_model_that_is_not_loaded_loads_it_with_the_banner_showing_the_progress(page: Page, site: Site) -> None:
    log_in(page, MEMBER)
    picker = page.get_by_label("Model for this conversation")
    # Served first; then the one this member may have loaded (the others' policy keeps them for admins).
    expect(picker.locator("option")).to_have_text([f"{TINY} (default)", f"{SMALL} (loads when asked)"])

    picker.select_option(SMALL)
    banner = page.locator("#model-banner")
    expect(banner).to_have_text("Model not loaded yet: sending a message loads it")
    page.get_by_label("Message").fill("Hello there")
    page.get_by_label("Message").press("Enter")
    expect(banner).to_have_text(re.compile(r"Model loading\.\.\. \(Loading Small-Chat-200M, \d+%\)"), timeout=ANSWER_TIMEOUT_MS)
    percents = []
    while not banner.is_hidden():
        if found := re.search(r"(\d+)%", banner.text_content() or ""):
            percents.append(int(found.group(1)))
        page.wait_for_timeout(100)
    assert len(set(percents)) >= 2 and percents == sorted(percents), percents  # the bar moved, forward

    expect(page.locator("#messages .message.assistant")).to_have_class(re.compile(r"\bdone\b"), timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#model-name")).to_have_text(SMALL)
    conversation_id = int(page.url.rstrip("/").split("/")[-1])
    with site.session(MEMBER) as member:
        answers = [m for m in member.get(f"/api/conversations/{conversation_id}/messages/").json() if m["role"] == "assistant"]
    assert [m["model_name"] for m in answers] == [SMALL]
    # Served now (by the only backend, so it is the default model too): no longer marked.
    expect(picker.locator("option")).to_have_text([f"{SMALL} (default)", SMALL])
