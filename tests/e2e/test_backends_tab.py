"""The Admin Dashboard's Backends tab in a real Chromium: adding a second real model server, draining,
resuming and removing it; the keys typed are never shown again."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from harness.site import ADMIN, Site
from harness.tabby_server import ADMIN_KEY, API_KEY, TabbyServer, run_tabby, wait_loaded
from tests.conftest import TINY, TINY_SERVER
from tests.e2e.conftest import log_in


@pytest.fixture(scope="module")
def second(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    with run_tabby(tmp_path_factory.mktemp("second"), demo_models, config=TINY_SERVER) as server:
        wait_loaded(server, TINY)
        yield server


def test_an_admin_adds_drains_resumes_and_removes_a_backend(page: Page, site: Site, second: TabbyServer) -> None:
    log_in(page, ADMIN)
    page.goto("/admin/backends/")
    expect(page.get_by_role("link", name="Backends")).to_have_attribute("aria-current", "page")
    default = page.locator('tr.backend-row[data-backend="default"]')
    expect(default.locator(".state-cell")).to_have_text("Ready")
    expect(default.locator(".model-cell")).to_have_text(TINY)
    expect(page.locator("#live")).to_have_text("Live")

    # A server that does not answer is added, and shown down; the keys typed leave the form.
    page.get_by_label("Name").fill("gpu-2")
    page.get_by_label("URL").fill("http://127.0.0.1:1")
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Add").click()
    expect(page.locator("tr.backend-row")).to_have_count(2)  # added, but down: nothing answers there
    added = page.locator('tr.backend-row[data-backend="gpu-2"]')
    expect(added.locator(".state-cell")).to_have_text("Down")
    expect(page.get_by_label("API key")).to_have_value("")
    page.once("dialog", lambda dialog: dialog.accept())
    added.get_by_role("button", name="Remove").click()
    expect(page.locator("tr.backend-row")).to_have_count(1)

    page.get_by_label("Name").fill("gpu-2")
    page.get_by_label("URL").fill(second.url)
    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Add").click()
    added = page.locator('tr.backend-row[data-backend="gpu-2"]')
    expect(added.locator(".state-cell")).to_have_text("Ready", timeout=20_000)
    expect(added.locator(".model-cell")).to_have_text(TINY)
    expect(added.locator(".health-cell")).to_have_text(re.compile("answering"))
    assert API_KEY not in page.content() and ADMIN_KEY not in page.content()

    added.get_by_role("button", name="Drain").click()
    expect(added.locator(".state-cell")).to_have_text("Draining (out of rotation)")
    added.get_by_role("button", name="Resume").click()
    expect(added.locator(".state-cell")).to_have_text("Ready")

    page.once("dialog", lambda dialog: dialog.accept())
    added.get_by_role("button", name="Remove").click()
    expect(page.locator("tr.backend-row")).to_have_count(1)
    expect(page.locator("#error")).to_be_hidden()
