"""What the pages say about the model server in a real Chromium: unreachable and back (the chat banner and
the Models tab), a refused admin key (the Models tab names the setting to fix), and a load TabbyAPI goes
on with after a switch stopped waiting for it.

A model server of this module's own, on one port, reads weights at 12 MB/s (the 200 MB model takes about
17 s, up to 1.4 s a module) and is stopped and started by the tests; its site gives up on a load after
one second without progress.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import wait_loaded
from tests.e2e.conftest import TIMEOUT_MS, log_in
from tests.models_admin.live import RestartableTabby

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
SERVER = {"model": {"model_name": TINY, "load_throttle_mbps": 12}, "developer": {"cpu_threads": 1}}
FIVE_SECONDS_MS = 5_000


@pytest.fixture(scope="module")
def model_server(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableTabby]:
    folder = tmp_path_factory.mktemp("models")
    for name in (TINY, SMALL):
        (folder / name).symlink_to(demo_models / name, target_is_directory=True)
    server = RestartableTabby(tmp_path_factory.mktemp("tabby"), folder)
    wait_loaded(server.start(SERVER), TINY)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def site(model_server: RestartableTabby, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    env = {"GANTRY_SWITCH_TIMEOUT": "1", "GANTRY_MAX_ANSWER_TOKENS": "8", "TABBY_CHECK_TIMEOUT": "2"}
    with run_site(tmp_path_factory.mktemp("site"), model_server.url, extra_env=env) as site:
        yield site


@pytest.fixture
def admin_page(browser: Browser, site: Site) -> Iterator[Page]:
    """An admin's browser on the Models tab, open beside the member's `page`."""
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    log_in(page, ADMIN)
    page.goto("/admin/models/")
    expect(page.locator("#dashboard")).to_have_attribute("data-live", "true")
    yield page
    context.close()


def expect_active(page: Page, model: str | None) -> None:
    checked = page.locator("#model-rows tr").filter(has=page.locator(".check", has_text="✓"))
    if model is None:
        expect(checked).to_have_count(0)
    else:
        expect(checked.locator(".model-id")).to_have_text([model])


def test_the_banner_and_the_models_tab_say_when_the_model_server_is_unreachable_and_when_it_is_back(
    page: Page, admin_page: Page, model_server: RestartableTabby
) -> None:
    log_in(page, MEMBER)
    banner = page.locator("#model-banner")
    expect(banner).to_be_hidden()
    expect_active(admin_page, TINY)

    model_server.stop()
    # The open pages keep the watcher asking: the banner tells before anybody sends anything.
    expect(banner).to_have_text("Model server unreachable", timeout=FIVE_SECONDS_MS)
    page.get_by_label("Message").fill("Are you there?")
    page.get_by_label("Message").press("Enter")
    question = page.locator("#messages .message.user")
    expect(question.locator(".status")).to_have_text("Queued (#1)")  # held for the server's return, not failed
    trouble = admin_page.locator("#trouble")
    expect(trouble).to_contain_text("Model server unreachable: TabbyAPI at ", timeout=FIVE_SECONDS_MS)
    expect(trouble).to_contain_text("cannot be reached")
    expect_active(admin_page, None)
    expect(admin_page.locator("#no-model")).to_be_hidden()
    expect(page.locator("#model-name")).to_have_text("No model loaded")

    wait_loaded(model_server.start(SERVER), TINY)
    expect(banner).to_be_hidden(timeout=FIVE_SECONDS_MS)
    expect(page.locator("#model-name")).to_have_text(TINY)
    expect(trouble).to_be_hidden(timeout=FIVE_SECONDS_MS)
    expect_active(admin_page, TINY)
    expect(page.locator("#messages .message.assistant")).to_have_count(1)  # the held message is answered
    expect(question.locator(".status")).to_be_hidden()


def test_the_models_tab_and_the_chat_say_while_tabbyapi_still_loads_a_model_a_switch_stopped_waiting_for(
    page: Page, admin_page: Page
) -> None:
    log_in(page, MEMBER)
    expect_active(admin_page, TINY)
    small = admin_page.locator(f'#model-rows tr[data-model="{SMALL}"]')
    small.get_by_role("button", name="Switch").click()
    admin_page.locator("#confirm-dialog").get_by_role("button", name="Confirm").click()

    error = admin_page.locator("#error")
    expect(error).to_have_text(
        f"Failed to switch model to {SMALL}. Reason: The model server made no progress for 1 second. "
        f"TabbyAPI goes on loading {SMALL} (below)."
    )
    abandoned = admin_page.locator("#abandoned")
    expect(abandoned).to_contain_text(f"TabbyAPI is still loading {SMALL}: a switch stopped waiting for it")
    expect(small.locator(".status-cell")).to_have_text("Still loading in TabbyAPI...")
    expect(admin_page.locator("#model-rows .switch:visible")).to_have_count(2)
    for button in admin_page.locator("#model-rows .switch").all():
        expect(button).to_be_disabled()
    expect(admin_page.get_by_role("button", name="Unload Model")).to_be_disabled()
    expect(page.locator("#model-banner")).to_have_text(f"Model loading... (Loading {SMALL})")

    expect(abandoned).to_be_hidden(timeout=60_000)
    expect_active(admin_page, SMALL)
    expect(error).to_have_text(re.compile(f"^Failed to switch model to {SMALL}"))  # what happened stays readable
    expect(page.locator("#model-banner")).to_be_hidden()
    expect(page.locator("#model-name")).to_have_text(SMALL)


def test_a_refused_admin_key_shows_in_the_models_tab_with_the_setting_to_fix(
    browser: Browser, model_server: RestartableTabby, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {"TABBY_ADMIN_KEY": "not-the-admin-key"}
    with run_site(tmp_path_factory.mktemp("wrong-key"), model_server.url, extra_env=env) as wrong:
        context = browser.new_context(base_url=wrong.url, viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        log_in(page, ADMIN)
        page.goto("/admin/models/")
        trouble = page.locator("#trouble")
        expect(trouble).to_have_text(
            f"TabbyAPI refused Gantry's admin key (Invalid API key); set TABBY_ADMIN_KEY to the admin_key in the "
            f"api_tokens.yml of the TabbyAPI at {model_server.url}."
        )
        expect(page.locator("#no-models")).to_be_hidden()
        expect(page.get_by_text("TabbyAPI lists no models")).to_be_hidden()
        context.close()
