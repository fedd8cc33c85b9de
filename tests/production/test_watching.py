"""Production mode: the web processes watch TabbyAPI together through PostgreSQL. While a message waits
they check it once a second in all (not once per process), a model loaded directly on TabbyAPI answers the
waiting message within two seconds of its load, and when nothing waits and nothing is in doubt they leave
TabbyAPI alone until the refresh interval (60 s here, the default). When the worker following a load a
switch gave up on dies, the web processes take over: the state still ends as TabbyAPI's.

Daphne processes, a Celery worker and Celery beat on a private Redis and a PostgreSQL database of their
own, and the model server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.site import ADMIN, MEMBER, Site, run_site, start_daphne
from harness.tabby_server import TabbyServer, free_port, load_events, run_tabby, wait_loaded
from tests.models_admin.live import backend, disagreement, loaded_model, query, started_together, wait_until
from tests.production.stack import private_database, private_redis, start_celery, start_worker

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
CHECK = '"GET /v1/model HTTP/1.1"'  # one light check in the model server's access log


@dataclass
class Stack:
    tabby: TabbyServer
    site: Site
    other_url: str


@pytest.fixture(scope="module")
def stack(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = {"model": {"model_name": TINY}, "developer": {"cpu_threads": 1}}
    workdir = tmp_path_factory.mktemp("production")
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SECRET_KEY": "production-test-secret-key",
            "GANTRY_MAX_ANSWER_TOKENS": "8",
        }
        port = free_port()
        with started_together(
            run_tabby(tmp_path_factory.mktemp("tabby"), demo_models, config=config, port=port),
            run_site(workdir, f"http://127.0.0.1:{port}", extra_env=env),
        ) as (tabby, site):
            other = free_port()
            start_daphne(site, other, name="daphne-2")
            start_celery(site, "beat", "beat", "--schedule", str(workdir / "beat-schedule"))
            start_worker(site, "worker-1")
            wait_loaded(tabby, TINY)
            yield Stack(tabby, site, f"http://127.0.0.1:{other}")


def checks_during(tabby: TabbyServer, seconds: float) -> int:
    before = tabby.log().count(CHECK)
    time.sleep(seconds)  # a window of time in which the watchers' checks are counted
    return tabby.log().count(CHECK) - before


def test_the_web_processes_check_once_a_second_in_all_while_a_message_waits_and_not_at_all_when_calm(stack: Stack) -> None:
    tabby, site = stack.tabby, stack.site
    with site.session(ADMIN) as admin, site.session(MEMBER) as member:
        wait_until(lambda: backend(site)["state"] == "ready", 15, "the site to see the model")
        # Gantry unloads it itself: the state is certain and nothing waits.
        assert admin.post("/api/admin/models/unload").status_code == 200
        calm = checks_during(tabby, 5)

        conversation = member.post("/api/conversations/", json={}).json()["id"]
        url = f"/api/conversations/{conversation}/messages/"
        question = member.post(url, json={"content": "Waiting for a model"}).json()
        assert question["status"] == "queued"
        waiting = checks_during(tabby, 5)

        assert load_events(tabby, TINY, load_throttle_mbps=2)[-1]["status"] == "finished"
        loaded_at = time.monotonic()
        wait_until(lambda: member.get(url).json()[0]["status"] != "queued", 10, "the held message to be released")
        released_after = time.monotonic() - loaded_at
        answered = wait_until(
            lambda: (found := member.get(url).json())[-1]["role"] == "assistant" and found[-1]["status"] == "done" and found,
            60,
            "the answer",
        )
        assert disagreement(site, admin, tabby) is None

    assert calm <= 1, f"{calm} checks in 5 s with nothing waiting (at most the periodic refresh's)"
    assert 3 <= waiting <= 7, f"{waiting} checks in 5 s from two web processes while a message waited"
    assert released_after < 2.0
    assert answered[-1]["model_name"] == TINY


# A load a switch gave up on, followed by a worker that dies


@pytest.fixture(scope="module")
def slow_stack(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TabbyServer, Site]]:
    """A model server on a 12 MB/s disk (the 200 MB model: about 17 s, up to 1.4 s a module), a site that
    gives up on a load after one second without progress, and a worker declared dead after two silent seconds."""
    folder = tmp_path_factory.mktemp("models")
    for name in (TINY, SMALL):
        (folder / name).symlink_to(demo_models / name, target_is_directory=True)
    config = {"model": {"load_throttle_mbps": 12}, "developer": {"cpu_threads": 1}}
    workdir = tmp_path_factory.mktemp("production-slow")
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SECRET_KEY": "production-test-secret-key",
            "GANTRY_SWITCH_TIMEOUT": "1",
            "GANTRY_OPERATION_STALE_AFTER": "2",
        }
        port = free_port()
        with started_together(
            run_tabby(tmp_path_factory.mktemp("slow-tabby"), folder, config=config, port=port),
            run_site(workdir, f"http://127.0.0.1:{port}", extra_env=env),
        ) as (tabby, site):
            start_celery(site, "beat", "beat", "--schedule", str(workdir / "beat-schedule"))
            assert load_events(tabby, TINY, load_throttle_mbps=0)[-1]["status"] == "finished"
            yield tabby, site


def test_when_the_worker_following_a_stalled_load_dies_the_web_processes_take_over_watching(
    slow_stack: tuple[TabbyServer, Site],
) -> None:
    tabby, site = slow_stack
    worker = start_worker(site, "worker-1")
    with site.session(ADMIN) as admin:
        wait_until(lambda: backend(site)["active_model"] == TINY, 10, f"the site to see {TINY}")
        stalled = admin.post("/api/admin/models/switch", json={"model_id": SMALL}, timeout=60)
        assert stalled.status_code == 504, stalled.text
        assert admin.post("/api/admin/models/switch", json={"model_id": TINY}).status_code == 409

        worker.kill()  # the process following the load
        worker.wait(timeout=10)
        following = "SELECT abandoned_load FROM models_admin_backend WHERE abandoned_load <> ''"
        assert query(site, following) == [{"abandoned_load": SMALL}]
        wait_until(lambda: not query(site, following), 10, "the web process to end the watch nobody keeps")
        assert loaded_model(tabby) is None, "TabbyAPI is still loading"

        deadline = time.monotonic() + 120
        while loaded_model(tabby) != SMALL:
            assert time.monotonic() < deadline, "TabbyAPI never finished the load"
            time.sleep(0.05)
        loaded_at = time.monotonic()
        wait_until(lambda: backend(site)["active_model"] == SMALL, 5, "the site to see the model the load ended with")
        assert time.monotonic() - loaded_at < 2.0
        assert disagreement(site, admin, tabby) is None
