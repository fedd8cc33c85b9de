"""A model's Settings page in a real Chromium: from the Models tab's Settings button, wrong values shown
under their fields and nothing saved, then saved, kept, and listed in the Activity tab."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from harness.site import ADMIN, Site
from tests.e2e.conftest import log_in

TINY = "Tiny-Chat-5M"


def test_an_admin_sets_a_models_settings_and_sees_each_wrong_one_under_its_field(page: Page, site: Site) -> None:
    log_in(page, ADMIN)
    page.goto("/admin/models/")
    row = page.locator(f'#model-rows tr[data-model="{TINY}"]')
    row.get_by_role("link", name="Settings").click()
    expect(page).to_have_url(f"/admin/models/{TINY}/settings/")
    expect(page.get_by_role("heading", name=f"Settings of {TINY}")).to_be_visible()

    page.locator("#setting-max_seq_len").fill("lots")
    page.locator("#setting-cache_size").fill("1000")
    page.locator("#setting-temperature").fill("0.7")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#error-max_seq_len")).to_have_text("max_seq_len must be a whole number.")
    expect(page.locator("#error-cache_size")).to_have_text("cache_size must be a multiple of 256 (say 1024).")
    expect(page.locator("#setting-max_seq_len")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#error-temperature")).to_be_hidden()
    expect(page.locator("#saved")).to_be_hidden()
    expect(page.locator("#setting-max_seq_len")).to_be_focused()

    page.locator("#setting-max_seq_len").fill("1024")
    page.locator("#setting-cache_size").fill("1024")
    page.locator("#setting-system_prompt").fill("Be brief.")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator("#saved")).to_have_text(
        re.compile(
            r"^Saved: cache_size, max_seq_len, system_prompt, temperature\.( Load parameters apply from the next load of .*)?$"
        )
    )
    expect(page.locator("#error-max_seq_len")).to_be_hidden()
    expect(page.locator("#error-cache_size")).to_be_hidden()

    page.reload()
    expect(page.locator("#setting-max_seq_len")).to_have_value("1024")
    expect(page.locator("#setting-temperature")).to_have_value("0.7")
    expect(page.locator("#setting-system_prompt")).to_have_value("Be brief.")
    expect(page.locator("#setting-top_p")).to_have_value("")

    page.get_by_role("link", name="Activity").click()
    latest = page.locator(".activity-table tbody tr").first
    expect(latest.locator("td")).to_have_text(
        [
            re.compile(r"\w+ \d+, \d\d:\d\d:\d\d"),
            "admin via dashboard",
            f"Settings of {TINY}",
            "max_seq_len unset; cache_size unset; temperature unset; system_prompt unset",
            'max_seq_len 1024; cache_size 1024; temperature 0.7; system_prompt "Be brief."',
            "—",
            "Saved",
            "",
        ]
    )
