"""When a session ends, every page of it notices at once: in a real Chromium, two tabs of one session."""

from __future__ import annotations

import time

from playwright.sync_api import Page, expect

from harness.site import MEMBER
from tests.e2e.conftest import log_in


def test_logging_out_in_one_tab_sends_the_sessions_other_tabs_to_the_login_page(page: Page) -> None:
    log_in(page, MEMBER)
    other_tab = page.context.new_page()  # the same browser: the same session
    received: list[str | bytes] = []
    other_tab.on("websocket", lambda socket: socket.on("framereceived", lambda payload: received.append(payload)))
    other_tab.goto("/")
    deadline = time.monotonic() + 15
    while not received:  # the socket's first event, the model's state: it is open
        assert time.monotonic() < deadline, "The other tab's socket did not open."
        other_tab.wait_for_timeout(50)  # lets Playwright deliver the page's events
    page.locator("#profile-button").click()
    page.get_by_role("menuitem", name="Log out").click()
    expect(page).to_have_url("/login/")
    # Its socket was closed with the session's end; the page reloaded onto the login page by itself.
    expect(other_tab).to_have_url("/login/?next=/")
    expect(other_tab.get_by_role("heading", name="Log in to Gantry")).to_be_visible()
