"""/healthz and /readyz on a live site whose model server is down (its address is a closed port).

(The ready case, and the database and Redis going away, are in tests/production/test_metrics_across_processes.py.)
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from harness.site import ADMIN, Site, run_site
from harness.tabby_server import free_port
from tests.figures import scrape

DOWN = "The model server (TabbyAPI) does not answer."


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(tmp_path_factory.mktemp("site"), f"http://127.0.0.1:{free_port()}") as site:
        yield site


def test_healthz_says_the_process_lives_whatever_else_is_down(site: Site) -> None:
    response = httpx.get(site.url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_names_the_model_server_when_it_does_not_answer(site: Site) -> None:
    response = httpx.get(site.url + "/readyz", timeout=30)
    assert response.status_code == 503
    assert response.json() == {
        "status": "not ready",
        "detail": DOWN,
        "failed": ["model_server"],
        "checks": {"database": "ok", "channel_layer": "ok", "model_server": DOWN},
        "backends": {"default": {"health": "The model server does not answer its health check.", "in_rotation": True}},
    }


def test_probes_answer_whatever_host_they_address(site: Site) -> None:
    # Docker's and Kubernetes' probes address a process by IP address or container name, which
    # ALLOWED_HOSTS need not list; pages on such a host are still refused.
    foreign = {"Host": "172.18.0.5:8000"}
    assert httpx.get(site.url + "/healthz", headers=foreign).status_code == 200
    assert httpx.get(site.url + "/readyz", headers=foreign, timeout=30).json()["failed"] == ["model_server"]
    assert httpx.get(site.url + "/login/", headers=foreign).status_code == 400


def test_the_metrics_say_the_model_server_is_down(site: Site) -> None:
    with site.session(ADMIN) as admin:
        figures = scrape(admin)
    assert figures.get("gantry_backend_up", backend="default") == 0
