"""Production mode: the model policies are acted on by the Celery worker running beat's `watch_fleet`
(the web process does not preload). A `preload` model is loaded when the worker starts, on a model server
holding nothing, and with `idle_unload_after` it is unloaded once idle that long after its load; it is
not loaded again until the next start."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.site import ADMIN, run_site
from harness.tabby_server import free_port, run_tabby
from tests.models_admin.live import loaded_model, query, started_together, wait_until
from tests.production.stack import private_database, private_redis, start_celery, start_worker

TINY = "Tiny-Chat-5M"


def test_the_worker_preloads_at_its_start_and_unloads_the_idle_model(
    demo_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("production")
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SECRET_KEY": "production-test-secret-key",
            "GANTRY_REFRESH_INTERVAL": "1",
        }
        port = free_port()
        empty = {"developer": {"cpu_threads": 1}}  # the model server starts holding nothing
        with started_together(
            run_tabby(tmp_path_factory.mktemp("tabby"), demo_models, config=empty, port=port),
            run_site(workdir, f"http://127.0.0.1:{port}", extra_env=env),
        ) as (tabby, site):
            with site.session(ADMIN) as admin:
                url = f"/api/admin/models/{TINY}/settings"
                wait_until(lambda: admin.get(url).status_code == 200, 30, "the site to list the models")
                saved = admin.put(url, json={"preload": True, "idle_unload_after": 2})
                assert saved.status_code == 200, saved.text
            time.sleep(2)
            assert loaded_model(tabby) is None  # the web process leaves preloads to the worker

            start_celery(site, "beat", "beat", "--schedule", str(workdir / "beat-schedule"))
            start_worker(site, "worker-1")
            wait_until(lambda: loaded_model(tabby) == TINY, 60, "the worker's preload")

            def policy_operations() -> list[dict[str, object]]:
                sql = "SELECT kind, status, to_model, from_model FROM models_admin_operation WHERE source = 'policy' ORDER BY id"
                return query(site, sql)

            wait_until(lambda: [op["kind"] for op in policy_operations()] == ["switch", "unload"], 30, "the idle unload")
            wait_until(lambda: policy_operations()[-1]["status"] == "succeeded", 30, "the unload's end")
            assert loaded_model(tabby) is None
            assert policy_operations()[0] == {"kind": "switch", "status": "succeeded", "to_model": TINY, "from_model": ""}
            time.sleep(3)  # preloaded once, at the start: not again
            assert loaded_model(tabby) is None and len(policy_operations()) == 2
