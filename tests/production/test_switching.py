"""Production mode: switches run by a real Celery worker, meeting daphne in Redis and PostgreSQL.

The model server reads from a simulated 50 MB/s disk, so a switch to the 200 MB model takes about four
seconds and reports 31 modules one by one. Celery beat refreshes every second and an operation whose
worker gave no sign of life for two seconds counts as dead.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from harness.site import ADMIN, BlockingConnection, Site, blocking_socket, receive_blocking, run_site
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.models_admin.live import backend, disagreement, loaded_model, operations, started_together, wait_until
from tests.production.stack import private_database, private_redis, start_celery, start_worker

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
SMALL_V2 = "Small-Chat-200M-v2"  # the same weights in a second folder


@dataclass
class Stack:
    tabby: TabbyServer
    site: Site
    worker: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def stack(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The model server, and daphne, one Celery worker and Celery beat on a private Redis and a PostgreSQL
    database of their own."""
    folder = tmp_path_factory.mktemp("models")
    for name, source in ((TINY, TINY), (SMALL, SMALL), (SMALL_V2, SMALL)):
        (folder / name).symlink_to(demo_models / source, target_is_directory=True)
    config = {"model": {"model_name": TINY, "load_throttle_mbps": 50}, "developer": {"cpu_threads": 1}}
    workdir = tmp_path_factory.mktemp("production")
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SECRET_KEY": "production-test-secret-key",
            "GANTRY_REFRESH_INTERVAL": "1",
            "GANTRY_OPERATION_STALE_AFTER": "2",
        }
        port = free_port()
        with started_together(
            run_tabby(tmp_path_factory.mktemp("tabby"), folder, config=config, port=port),
            run_site(workdir, f"http://127.0.0.1:{port}", extra_env=env),
        ) as (tabby, site):
            start_celery(site, "beat", "beat", "--schedule", str(workdir / "beat-schedule"))
            worker = start_worker(site, "worker-1")
            wait_loaded(tabby, TINY)
            yield Stack(tabby, site, worker)


def models_socket(site: Site, admin: httpx.Client) -> AbstractContextManager[BlockingConnection]:
    """The Models page's socket, opened as the page opens it: the admin's session cookie, the site's Origin."""
    return blocking_socket(site.url, "/ws/models/", admin.cookies["session_id"], 10)


def switch(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/api/admin/models/switch", json={"model_id": model})


def test_a_switch_reports_each_step_to_the_models_page_over_its_socket(stack: Stack) -> None:
    site, slow_tabby = stack.site, stack.tabby
    with site.session(ADMIN) as admin:
        assert switch(admin, TINY).status_code == 200
        with models_socket(site, admin) as socket, ThreadPoolExecutor(max_workers=1) as pool:
            answer = pool.submit(switch, admin, SMALL)
            events = receive_blocking(socket, lambda e: e["type"] == "model.progress" and e["step"] == "done", 60)
            response = answer.result(timeout=30)
        assert response.status_code == 200
        assert response.json() == {"message": f"Model switched to {SMALL}", "model_id": SMALL}

        operation = operations(site)[0]
        progress = [e for e in events if e["type"] == "model.progress"]
        assert {e["operation_id"] for e in progress} == {operation["id"]}
        texts = list(dict.fromkeys(e["text"] for e in progress))
        assert texts == ["Step 1: Unloading current model...", f"Step 2: Loading {SMALL}...", "✓ Model switched successfully!"]
        loading = [e for e in progress if e["step"] == "loading" and e["module"]]
        modules = [e["module"] for e in loading]  # module k of 31, one by one (the last also comes as "finished")
        assert modules == sorted(modules) and list(dict.fromkeys(modules)) == list(range(1, 32))
        assert {e["modules"] for e in loading} == {31}
        percents = [e["percent"] for e in progress]
        assert percents == sorted(percents) and percents[-1] == 100
        assert all(e["percent"] <= 40 for e in progress if e["step"] == "unloading")
        assert all(40 < e["percent"] <= 100 for e in loading)

        states = [(e["state"], e["active_model"], e["target_model"]) for e in events if e["type"] == "model.state"]
        assert states[0] == ("switching", TINY, SMALL)
        assert states[-1] == ("ready", SMALL, None)
        assert loaded_model(slow_tabby) == SMALL
        assert disagreement(site, admin, slow_tabby) is None


def test_a_switch_whose_worker_is_killed_is_recorded_as_interrupted_and_the_state_follows_tabbyapi(stack: Stack) -> None:
    site, slow_tabby = stack.site, stack.tabby
    with site.session(ADMIN) as admin:
        assert loaded_model(slow_tabby) != SMALL_V2
        # The caller gives up after a second, as a closed browser tab would: nobody waits on the switch.
        impatient = httpx.Client(base_url=site.url, cookies=admin.cookies, timeout=httpx.Timeout(10, read=1))
        with models_socket(site, admin) as socket, ThreadPoolExecutor(max_workers=1) as pool, impatient:
            gave_up = pool.submit(switch, impatient, SMALL_V2)
            receive_blocking(socket, lambda e: e["type"] == "model.progress" and e["step"] == "loading" and e["module"] >= 3, 30)
            os.kill(stack.worker.pid, signal.SIGKILL)
            stack.worker.wait(timeout=10)
            with pytest.raises(httpx.ReadTimeout):
                gave_up.result(timeout=30)

        # TabbyAPI finishes the load on its own; with no worker, Gantry's record is stuck mid-switch.
        wait_until(lambda: loaded_model(slow_tabby) == SMALL_V2, 30, f"TabbyAPI to finish loading {SMALL_V2}")
        interrupted = operations(site)[0]
        assert (interrupted["to_model"], interrupted["status"]) == (SMALL_V2, "running")
        assert backend(site)["state"] == "switching"

        stack.worker = start_worker(site, "worker-2")
        wait_until(lambda: disagreement(site, admin, slow_tabby) is None, 20, "Gantry's state to follow TabbyAPI")
        operation = next(op for op in operations(site) if op["id"] == interrupted["id"])
        assert (operation["status"], operation["error_kind"]) == ("failed", "interrupted")
        assert operation["error"] == "The operation was interrupted: the process running it stopped."
        assert backend(site) == {"state": "ready", "active_model": SMALL_V2, "target_model": "", "operation_id": None}
        assert [m["id"] for m in admin.get("/api/admin/models").json()["models"] if m["active"]] == [SMALL_V2]
