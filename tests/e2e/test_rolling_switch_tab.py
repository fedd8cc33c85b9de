"""The Backends tab in a real Chromium during a fleet switch of two real model servers: the bar of the
whole switch and each backend's step line and bar, one backend after the other."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from harness.site import ADMIN, Site, run_site
from harness.tabby_server import ADMIN_KEY, API_KEY, TabbyServer, run_tabby, wait_loaded
from tests.conftest import TINY
from tests.e2e.conftest import log_in
from tests.models_admin.live import started_together

SMALL = "Small-Chat-200M"
# At 40 MB/s the 200 MB model takes about 5 s to load: each backend's step is seen moving.
SERVER = {"model": {"model_name": TINY, "load_throttle_mbps": 40}, "developer": {"cpu_threads": 1}}


@pytest.fixture(scope="module")
def servers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TabbyServer]]:
    with started_together(
        run_tabby(tmp_path_factory.mktemp("first"), demo_models, config=SERVER),
        run_tabby(tmp_path_factory.mktemp("second"), demo_models, config=SERVER),
    ) as started:
        for server in started:
            wait_loaded(server, TINY)
        yield started


@pytest.fixture(scope="module")
def site(servers: list[TabbyServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(tmp_path_factory.mktemp("site"), servers[0].url) as site:
        with site.session(ADMIN) as admin:
            added = admin.post("/api/admin/backends", json={"name": "gpu-2", "url": servers[1].url, "api_key": API_KEY, "admin_key": ADMIN_KEY})
            assert added.status_code == 201, added.text
        yield site


def test_the_backends_tab_shows_a_fleet_switch_backend_by_backend(page: Page, site: Site) -> None:
    log_in(page, ADMIN)
    page.goto("/admin/backends/")
    expect(page.locator("#live")).to_have_text("Live")
    expect(page.locator('tr.backend-row[data-backend="gpu-2"] .state-cell')).to_have_text("Ready", timeout=20_000)
    expect(page.locator("#roll-panel")).to_be_hidden()

    answers: list[httpx.Response] = []

    def switch() -> None:
        with site.session(ADMIN) as admin:
            answers.append(admin.post("/api/admin/models/switch", json={"model_id": SMALL}, timeout=300))

    thread = threading.Thread(target=switch)
    thread.start()
    panel = page.locator("#roll-panel")
    expect(panel).to_be_visible(timeout=10_000)
    expect(page.locator("#roll-summary")).to_have_text(f"{TINY} → {SMALL} (one backend at a time)")
    first, second = page.locator('.roll-step[data-backend="default"]'), page.locator('.roll-step[data-backend="gpu-2"]')
    # The default backend moves while the second waits its turn; then the second moves.
    expect(first.locator(".progress-text")).to_have_text(re.compile("Loading " + SMALL), timeout=20_000)
    expect(second.locator(".progress-text")).to_have_text(re.compile("Waiting for its turn"))
    expect(page.locator("#roll-text")).to_have_text("Switching")
    expect(second.locator(".progress-text")).to_have_text(re.compile("Loading " + SMALL), timeout=30_000)
    expect(first).to_have_attribute("data-step", "done")
    expect(page.locator("#roll-text")).to_have_text("Switched", timeout=60_000)
    expect(page.locator("#roll-percent")).to_have_text("100 %")
    expect(second).to_have_attribute("data-step", "done")
    thread.join(timeout=60)
    assert answers and answers[0].status_code == 200, answers
    for name in ("default", "gpu-2"):
        expect(page.locator(f'tr.backend-row[data-backend="{name}"] .model-cell')).to_have_text(SMALL)
