"""The profile's API keys page in a real browser: make a key (its name checked), copy it the one time it
is shown, use it with the openai client, see when it was last used, revoke it; an admin sees and revokes
everyone's keys."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from playwright.sync_api import Browser, Page, expect

from harness.site import ADMIN, MEMBER, OUTSIDER, Site
from tests.e2e.conftest import TIMEOUT_MS, log_in
from tests.gateway.live import make_key, openai_client


@pytest.fixture
def page(browser: Browser, site: Site, tmp_path: Path) -> Iterator[Page]:
    """A fresh context that may use the clipboard (the Copy button)."""
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def test_a_member_makes_copies_uses_and_revokes_a_key(page: Page, site: Site) -> None:
    log_in(page, MEMBER)
    page.get_by_role("button", name="Account menu").click()
    page.get_by_role("menuitem", name="API keys").click()
    expect(page).to_have_url("/keys/")
    expect(page.get_by_role("heading", name="API keys")).to_be_visible()
    expect(page.get_by_text("No key yet.")).to_be_visible()
    expect(page.locator("#base-url")).to_have_text(site.url + "/v1")

    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("alert")).to_contain_text("Give the key a name")

    page.get_by_label("Name of a new key").fill("laptop")
    page.get_by_role("button", name="Create key").click()
    shown = page.locator("#new-key-value")
    expect(page.get_by_text("It will not be shown again.")).to_be_visible()
    expect(shown).to_have_text(re.compile(r"^gsk_[A-Za-z0-9_-]{40,}$"))
    key = shown.inner_text()
    assert key.startswith("gsk_")
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_text("Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == key
    row = page.locator("#keys-body tr", has_text="laptop")
    expect(row).to_contain_text(key[:12] + "…")
    expect(row).to_contain_text("never")

    # The key works, as its user.
    assert [m.id for m in openai_client(site, key).models.list()]

    page.reload()
    expect(page.locator("#new-key")).to_be_hidden()
    assert key not in page.content()
    row = page.locator("#keys-body tr", has_text="laptop")
    expect(row).not_to_contain_text("never")  # last used: just now

    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(row).to_have_count(0)
    expect(page.get_by_text("No key yet.")).to_be_visible()
    with pytest.raises(openai.AuthenticationError):
        openai_client(site, key).models.list()
    page.reload()
    expect(page.get_by_text("No key yet.")).to_be_visible()


def test_an_admin_sees_and_revokes_everyones_keys(page: Page, site: Site) -> None:
    _, key = make_key(site, OUTSIDER, "outsider's script")
    log_in(page, ADMIN)
    page.goto("/keys/")
    row = page.locator("#keys-body tr", has_text="outsider's script")
    expect(row).to_contain_text("outsider")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(row).to_have_count(0)
    with pytest.raises(openai.AuthenticationError):
        openai_client(site, key).models.list()
