"""The Admin Dashboard in a real Chromium: switching and unloading models with live progress, the
Activity tab, and who may see any of it. A model server of this module's own reads weights at
100 MB/s, so loading Small-Chat-200M takes about two seconds, with real progress module by module.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import TabbyServer, run_tabby, wait_loaded
from tabby.demo import DEMO_MODELS
from tests.e2e.conftest import TIMEOUT_MS, log_in

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
BROKEN = "Broken-Chat-1M"
SWITCH_TIMEOUT_MS = 60_000
STEP_1 = "Step 1: Unloading current model..."
SWITCHED = "✓ Model switched successfully!"

# Records the progress panel each time the page redraws it, with whether every button was disabled then.
RECORD_PROGRESS = """() => {
  window.__progress = [];
  const panel = document.getElementById("progress");
  new MutationObserver(() => {
    const entry = {
      visible: !panel.hidden,
      text: document.getElementById("progress-text").textContent,
      percent: Number(document.getElementById("progress-bar").getAttribute("aria-valuenow")),
      detail: document.getElementById("progress-detail").textContent,
      disabled: [...document.querySelectorAll("#model-rows .switch, #unload-button, #refresh-button")].every((b) => b.disabled),
    };
    const last = window.__progress[window.__progress.length - 1];
    if (!last || JSON.stringify(last) !== JSON.stringify(entry)) window.__progress.push(entry);
  }).observe(document.getElementById("dashboard"), {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def model_dir(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models (not the real one beside them), linked into a folder of this module's own (one test adds
    a broken model to it)."""
    folder = tmp_path_factory.mktemp("models")
    for spec in DEMO_MODELS:
        (folder / spec.name).symlink_to(demo_models / spec.name, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def slow_disk_tabby(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    """A model server of this module's own: Tiny-Chat-5M loaded, weights read at 100 MB/s."""
    config = {"model": {"model_name": TINY, "load_throttle_mbps": 100}}
    with run_tabby(tmp_path_factory.mktemp("tabby"), model_dir, config=config) as server:
        wait_loaded(server, TINY)
        yield server


@pytest.fixture(scope="module")
def site(slow_disk_tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The real site, pointing at `slow_disk_tabby`."""
    with run_site(tmp_path_factory.mktemp("site"), slow_disk_tabby.url) as site:
        yield site


@pytest.fixture
def second_page(browser: Browser, site: Site) -> Iterator[Page]:
    """Another admin's browser, open at the same time as `page`."""
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


def make_active(site: Site, model: str) -> None:
    with site.session(ADMIN) as client:
        response = client.post("/api/admin/models/switch", json={"model_id": model})
    assert response.status_code == 200, response.text


def open_models_tab(page: Page) -> None:
    log_in(page, ADMIN)
    page.goto("/admin/models/")
    expect(page.locator("#dashboard")).to_have_attribute("data-live", "true")  # the socket is open


def row(page: Page, model: str) -> Locator:
    return page.locator(f'#model-rows tr[data-model="{model}"]')


def expect_active(page: Page, model: str | None) -> None:
    """✓ and Active on `model`'s row and on no other (on none for None)."""
    checked = page.locator("#model-rows tr").filter(has=page.locator(".check", has_text="✓"))
    if model is None:
        expect(checked).to_have_count(0)
        return
    expect(checked).to_have_count(1)
    expect(row(page, model).locator(".model-cell")).to_have_text(f"✓ {model}")
    expect(row(page, model).locator(".status-cell")).to_have_text("Active")
    expect(row(page, model).get_by_role("button", name="Switch")).to_be_hidden()


def recorded(page: Page) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = page.evaluate("window.__progress")
    return [e for e in entries if e["visible"]]


def texts(entries: list[dict[str, Any]]) -> list[str]:
    """The step lines in the order shown, each once."""
    return [e["text"] for i, e in enumerate(entries) if i == 0 or entries[i - 1]["text"] != e["text"]]


def confirm(page: Page, question: str) -> None:
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#confirm-text")).to_have_text(question)
    dialog.get_by_role("button", name="Confirm").click()
    expect(dialog).to_be_hidden()


def test_an_admin_switches_and_unloads_while_another_admin_watches_the_same_progress(
    page: Page, second_page: Page, site: Site
) -> None:
    make_active(site, TINY)
    log_in(page, ADMIN)
    page.locator("#profile-button").click()
    page.get_by_role("menuitem", name="Admin Dashboard").click()
    expect(page).to_have_url("/admin/models/")
    expect(page.get_by_role("heading", name="Admin Dashboard")).to_be_visible()
    expect(page.get_by_role("link", name="Models")).to_have_attribute("aria-current", "page")
    expect(page.get_by_role("heading", name="Available Models")).to_be_visible()
    expect(page.locator(".models-table thead th")).to_have_text(["Model", "Status", "Actions"])
    expect(page.locator("#model-rows tr .model-id")).to_have_text(["Large-Chat-1G", SMALL, TINY])
    expect_active(page, TINY)
    expect(row(page, SMALL).get_by_role("button", name="Switch")).to_be_visible()
    expect(page.locator("#dashboard")).to_have_attribute("data-live", "true")  # the socket is open
    open_models_tab(second_page)
    for each in (page, second_page):
        each.evaluate(RECORD_PROGRESS)

    row(page, SMALL).get_by_role("button", name="Switch").click()
    confirm(page, f"Switch to {SMALL}? Chats hold new messages until it is loaded.")

    for each in (page, second_page):
        expect(each.locator("#progress-text")).to_have_text(SWITCHED, timeout=SWITCH_TIMEOUT_MS)
        expect_active(each, SMALL)
        expect(row(each, TINY).get_by_role("button", name="Switch")).to_be_enabled()
        seen = recorded(each)
        assert texts(seen) == ["Waiting to start...", STEP_1, f"Step 2: Loading {SMALL}...", SWITCHED], seen
        loading = [e["percent"] for e in seen if e["text"] == f"Step 2: Loading {SMALL}..."]
        assert loading == sorted(loading) and loading[0] == 40 and loading[-1] == 100, loading
        assert len(set(loading)) >= 10, f"The bar did not move with the load: {loading}"
        details = [e["detail"] for e in seen]
        assert any(re.fullmatch(r"module \d+ of 31 · about \d+ s left", d) for d in details), details
        assert all(e["disabled"] for e in seen if e["text"] != SWITCHED), seen
        assert not seen[-1]["disabled"] and seen[-1]["percent"] == 100

    page.get_by_role("button", name="Unload Model").click()
    confirm(page, f"Unload {SMALL}? Chats show 'Model not available' until you switch to a model.")
    for each in (page, second_page):
        expect(each.locator("#progress-text")).to_have_text("✓ Model unloaded", timeout=SWITCH_TIMEOUT_MS)
        expect_active(each, None)
        expect(each.locator("#no-model")).to_have_text(
            "No model is loaded. Chat shows 'Model not available' until you switch to one."
        )
        expect(each.get_by_role("button", name="Unload Model")).to_be_disabled()
        assert texts(recorded(each))[-2:] == [STEP_1, "✓ Model unloaded"]


def test_cancelling_the_dialog_switches_nothing(page: Page, site: Site) -> None:
    make_active(site, TINY)
    open_models_tab(page)
    row(page, SMALL).get_by_role("button", name="Switch").click()
    page.locator("#confirm-dialog").get_by_role("button", name="Cancel").click()
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    page.reload()
    expect_active(page, TINY)
    expect(page.locator("#progress")).to_be_hidden()


def test_a_switch_started_through_the_api_shows_on_an_open_dashboard(page: Page, site: Site) -> None:
    make_active(site, TINY)
    open_models_tab(page)
    page.evaluate(RECORD_PROGRESS)
    answers: list[httpx.Response] = []

    def switch_by_script() -> None:
        with site.session(ADMIN) as client:
            answers.append(client.post("/api/admin/models/switch", json={"model_id": SMALL}))

    script = threading.Thread(target=switch_by_script)
    script.start()
    try:
        expect(page.locator("#progress")).to_be_visible()
        expect(page.locator("#progress-text")).to_have_text(SWITCHED, timeout=SWITCH_TIMEOUT_MS)
    finally:
        script.join()
    assert answers[0].status_code == 200
    assert answers[0].json() == {"message": f"Model switched to {SMALL}", "model_id": SMALL}
    expect_active(page, SMALL)
    seen = recorded(page)
    assert texts(seen) == ["Waiting to start...", STEP_1, f"Step 2: Loading {SMALL}...", SWITCHED], seen
    assert all(e["disabled"] for e in seen if e["text"] != SWITCHED), seen


def test_a_dashboard_opened_during_a_switch_shows_it_running(page: Page, site: Site, slow_disk_tabby: TabbyServer) -> None:
    make_active(site, TINY)
    log_in(page, ADMIN)
    script = threading.Thread(target=make_active, args=(site, SMALL))
    script.start()
    try:
        with slow_disk_tabby.client() as tabby:
            deadline = time.monotonic() + 30
            # 503 once the old model is gone: the switch is under way, and Small-Chat-200M loads for ~2 s more.
            while tabby.get("/v1/model").status_code == 200:
                assert time.monotonic() < deadline, "The switch never started."
        page.goto("/admin/models/")
        expect(page.locator("#progress")).to_be_visible()
        expect(page.get_by_role("button", name="Unload Model")).to_be_disabled()
        expect(page.locator("#progress-text")).to_have_text(SWITCHED, timeout=SWITCH_TIMEOUT_MS)
    finally:
        script.join()
    expect_active(page, SMALL)
    expect(page.get_by_role("button", name="Unload Model")).to_be_enabled()


def test_a_failed_switch_says_why_and_that_the_previous_model_is_back(page: Page, site: Site, model_dir: Path) -> None:
    make_active(site, TINY)
    open_models_tab(page)
    expect(row(page, BROKEN)).to_have_count(0)
    broken = model_dir / BROKEN
    broken.mkdir()
    try:
        (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": ')
        page.get_by_role("button", name="Refresh").click()
        expect(row(page, BROKEN)).to_have_count(1)
        expect(page.locator("#refreshed")).to_contain_text("List refreshed")

        row(page, BROKEN).get_by_role("button", name="Switch").click()
        confirm(page, f"Switch to {BROKEN}? Chats hold new messages until it is loaded.")
        error = page.locator("#error")
        expect(error).to_contain_text(f"The previous model, {TINY}, was loaded again", timeout=SWITCH_TIMEOUT_MS)
        expect(error).to_contain_text(f"Failed to switch model to {BROKEN}. Reason: TabbyAPI could not load {BROKEN}: ")
        expect(error).to_contain_text("config.json")
        expect(page.locator("#progress")).to_be_hidden()
        expect_active(page, TINY)
    finally:
        shutil.rmtree(broken)
    page.get_by_role("button", name="Refresh").click()
    expect(row(page, BROKEN)).to_have_count(0)

    page.get_by_role("link", name="Activity").click()
    latest = page.locator(".activity-table tbody tr").first
    expect(latest.locator("td")).to_have_text(
        [
            re.compile(r"\w+ \d+, \d\d:\d\d:\d\d"),
            "admin via dashboard",
            "Switch",
            TINY,
            BROKEN,
            re.compile(r"^\d+\.\d s$"),
            f"Failed rolled back to {TINY}",
            re.compile(f"TabbyAPI could not load {BROKEN}"),
        ]
    )


def test_the_activity_tab_lists_operations_newest_first_with_who_and_outcome(page: Page, site: Site) -> None:
    make_active(site, TINY)
    assert site.manage("unload_model").strip() == "Model unloaded successfully."
    make_active(site, TINY)
    log_in(page, ADMIN)
    page.goto("/admin/models/")
    page.get_by_role("link", name="Activity").click()
    expect(page).to_have_url("/admin/activity/")
    expect(page.get_by_role("link", name="Activity")).to_have_attribute("aria-current", "page")
    table = page.locator(".activity-table")
    expect(table.locator("thead th")).to_have_text(["When", "Who", "Action", "From", "To", "Duration", "Outcome", "Error"])
    rows = table.locator("tbody tr")
    expect(rows.nth(0).locator("td")).to_have_text(
        [re.compile(r"\d\d:\d\d:\d\d"), "admin via API", "Switch", "—", TINY, re.compile(r"^\d+\.\d s$"), "Succeeded", ""]
    )
    expect(rows.nth(1).locator("td")).to_have_text(
        [re.compile(r"\d\d:\d\d:\d\d"), "command", "Unload", TINY, "—", re.compile(r"^\d+\.\d s$"), "Succeeded", ""]
    )
    started = rows.locator("time").evaluate_all("times => times.map((t) => t.getAttribute('datetime'))")
    assert started == sorted(started, reverse=True) and len(started) >= 2


def test_a_member_has_no_way_into_the_dashboard(page: Page, site: Site) -> None:
    log_in(page, MEMBER)
    page.locator("#profile-button").click()
    expect(page.locator("#profile-menu").get_by_role("menuitem", name="Log out")).to_be_visible()
    expect(page.locator("#profile-menu").get_by_role("menuitem", name="Admin Dashboard")).to_have_count(0)
    for url in ("/admin/models/", "/admin/activity/", "/admin/"):
        page.goto(url)
        expect(page).to_have_url(re.compile(r"/login/\?next="))
        expect(page.get_by_role("heading", name="Admin Dashboard")).to_have_count(0)

    with site.session(MEMBER) as member:
        refused = member.get("/api/admin/models")
        assert refused.status_code == 403 and refused.json()["detail"]
        assert member.post("/api/admin/models/switch", json={"model_id": TINY}).status_code == 403
    anonymous = httpx.get(site.url + "/api/admin/models")
    assert anonymous.status_code == 401 and anonymous.json()["detail"]
    assert httpx.get(site.url + "/admin/models/", follow_redirects=False).status_code == 302
