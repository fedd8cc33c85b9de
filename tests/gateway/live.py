"""Shared by the live tests of the OpenAI-compatible API: a personal key made through the keys API."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai

from harness.site import ADMIN, Site, run_site
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.conftest import TINY
from tests.models_admin.live import started_together, wait_until


def make_key(site: Site, user: tuple[str, str], name: str = "tests") -> tuple[int, str]:
    with site.session(user) as client:
        response = client.post("/api/keys", json={"name": name})
        assert response.status_code == 201, response.text
        body = response.json()
        return int(body["id"]), str(body["key"])


def openai_client(site: Site, key: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=site.url + "/v1", api_key=key, timeout=timeout, max_retries=0)


@contextmanager
def site_loading_on_request(
    workdir: Path, demo_models: Path, loadable: tuple[str, ...], env: dict[str, str]
) -> Iterator[tuple[TabbyServer, Site]]:
    """A site and its model server holding the tiny model, which reads weights at 80 MB/s (the 200 MB
    model's load lasts a few seconds: its progress is seen), with `loadable` open to everyone's requests."""
    config = {"model": {"model_name": TINY, "load_throttle_mbps": 80}, "developer": {"cpu_threads": 1}}
    port = free_port()
    with started_together(
        run_tabby(workdir / "tabby", demo_models, config=config, port=port, ready_timeout=120),
        run_site(workdir / "site", f"http://127.0.0.1:{port}", extra_env={"GANTRY_REFRESH_INTERVAL": "1", **env}),
    ) as (tabby, site):
        wait_loaded(tabby, TINY, timeout=120)
        with site.session(ADMIN) as admin:
            wait_until(lambda: admin.get("/api/admin/models").status_code == 200, 30, "the model list")
            for model in loadable:
                response = admin.put(f"/api/admin/models/{model}/settings", json={"load_on_request": "everyone"})
                assert response.status_code == 200, response.text
        yield tabby, site
