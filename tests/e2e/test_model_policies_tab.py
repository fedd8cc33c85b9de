"""Model policies in a real Chromium: set on a model's Settings page, then shown in the Models tab, a pin on
a pinned model and, for a loaded model with `idle_unload_after`, the time until it is unloaded, counting
down. (The idle time here is long: the shared model server keeps its model for the other tests.)"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from harness.site import ADMIN, Site
from tests.e2e.conftest import log_in

TINY = "Tiny-Chat-5M"


@pytest.fixture
def clean_settings(site: Site) -> Iterator[None]:
    yield
    with site.session(ADMIN) as admin:
        assert admin.put(f"/api/admin/models/{TINY}/settings", json={}).status_code == 200


def save(page: Page, saved: str, **fields: str) -> None:
    page.goto(f"/admin/models/{TINY}/settings/")
    for name, value in fields.items():
        field = page.locator(f"#setting-{name}")
        if field.evaluate("element => element.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)
    page.get_by_role("button", name="Save settings").click()
    # Policies are no load parameters: nothing waits for the model's next load.
    expect(page.locator("#saved")).to_have_text(saved)


def test_the_models_tab_shows_the_pin_and_the_time_until_an_idle_unload(page: Page, site: Site, clean_settings: None) -> None:
    log_in(page, ADMIN)
    page.goto("/admin/models/")
    row = page.locator(f'#model-rows tr[data-model="{TINY}"]')
    expect(row.locator(".status-text")).to_have_text("Active")
    expect(row.get_by_role("img", name="Pinned")).to_be_hidden()
    expect(row.locator(".idle-unload")).to_be_hidden()

    save(page, "Saved: load_on_request, pinned.", pinned="true", load_on_request="everyone")
    page.reload()
    expect(page.locator("#setting-pinned")).to_have_value("true")
    expect(page.locator("#setting-load_on_request")).to_have_value("everyone")
    page.locator("#setting-idle_unload_after").fill("soon")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#error-idle_unload_after")).to_have_text(
        "idle_unload_after must be a whole number of seconds from 1 to 31,536,000 (a year), or empty."
    )

    page.goto("/admin/models/")
    expect(row.get_by_role("img", name="Pinned")).to_be_visible()
    expect(row.locator(".idle-unload")).to_be_hidden()  # a pinned model is never unloaded for being idle

    save(page, "Saved: idle_unload_after, pinned.", pinned="", idle_unload_after="600")
    page.goto("/admin/models/")
    expect(row.get_by_role("img", name="Pinned")).to_be_hidden()
    countdown = row.locator(".idle-unload")
    expect(countdown).to_have_text(re.compile(r"^Unloads if idle in (10:00|9:[0-5]\d)$"))
    first = countdown.inner_text()
    expect(countdown).not_to_have_text(first, timeout=3_000)  # it counts down
    expect(countdown).to_have_attribute("title", re.compile("600 s without a request"))
    expect(row.locator(".status-text")).to_have_text("Active")
