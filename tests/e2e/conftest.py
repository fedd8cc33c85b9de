"""A real Chromium (Debian's, driven by Playwright) against the real site.

One browser for the browser tests, one fresh context (cookies, storage) per test. A failed test leaves a
screenshot of its page in its pytest tmp dir; the report says where.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from harness.site import Site, run_site
from harness.tabby_server import TabbyServer

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps calling home, which a closed network punishes.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000


# Package scope: Playwright's sync API keeps an event loop running on the main thread while it is
# open, which would make every later async test fail with "cannot be called from a running event loop".
@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium not found at {CHROMIUM}; `make test` installs Debian's chromium package.", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=60_000)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The real site with short answers: the demo model rambles for 512 tokens (~15 s on a CPU) otherwise."""
    with run_site(tmp_path_factory.mktemp("site"), tabby.url, extra_env={"GANTRY_MAX_ANSWER_TOKENS": "40"}) as site:
        yield site


@pytest.fixture
def page(browser: Browser, site: Site, tmp_path: Path) -> Iterator[Page]:
    """A page in a fresh context whose relative URLs go to `site`."""
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def log_in(page: Page, user: tuple[str, str]) -> None:
    """Log in through the real login form and land on the chat page."""
    page.goto("/login/")
    page.get_by_label("Username").fill(user[0])
    page.get_by_label("Password").fill(user[1])
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url("/")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    page = getattr(item, "funcargs", {}).get("page")
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.when == "call" and report.failed and page is not None and tmp_path is not None and not page.is_closed():
        path = tmp_path / "failure.png"
        try:
            page.screenshot(path=path, full_page=True)
        except PlaywrightError as exc:  # the page may have crashed, which is what failed
            report.sections.append(("screenshot", f"No screenshot: {exc}"))
        else:
            report.sections.append(("screenshot", f"The page at the failure: {path}"))
    return report
