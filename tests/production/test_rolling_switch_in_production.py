"""Production mode with a fleet: a fleet switch while members chat, run by a Celery worker, with two daphne
processes, Celery beat, Redis and PostgreSQL: the backends move one at a time and no message waits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.site import Site, run_site, start_daphne
from harness.tabby_server import free_port, load_events, wait_loaded
from tests.conftest import TINY
from tests.models_admin.fleet_live import SECOND, Pair, add_second
from tests.models_admin.test_rolling_switch import CHATTERS, SERVER, SMALL, check_every_message, steps_of, switch_while_chatting
from tests.production.stack import private_database, private_redis, start_celery, start_worker


@pytest.fixture(scope="module")
def pair(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Two servers on slow disks, holding the small model (its first load asked for at full speed)."""
    servers = Pair(tmp_path_factory.mktemp("fleet"), demo_models)
    try:
        for server in (servers.first, servers.second):
            load_events(server.start(SERVER), SMALL, load_throttle_mbps=0)
            wait_loaded(server.start(SERVER), SMALL)
        yield servers
    finally:
        servers.first.stop()
        servers.second.stop()


@pytest.fixture(scope="module")
def site(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("production")
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "SECRET_KEY": "production-test-secret-key", "GANTRY_MAX_ANSWER_TOKENS": "16"}
        env["GANTRY_MAX_CONCURRENT_GENERATIONS"] = str(CHATTERS)  # one backend carries them all during the switch
        with run_site(workdir, pair.first.url, extra_env=env) as site:
            start_daphne(site, free_port(), name="daphne-2")
            start_celery(site, "beat", "beat", "--schedule", str(workdir / "beat-schedule"))
            start_worker(site, "worker-1")
            add_second(site, pair.second.url)
            yield site


async def test_a_fleet_switch_moves_one_backend_at_a_time_in_production(site: Site) -> None:
    answer, asked, began, ended = await switch_while_chatting(site, TINY)
    assert answer.status_code == 200, answer.text
    answers = check_every_message(site, asked, began, ended)
    steps = steps_of(site, answer.json()["roll_id"])
    assert [(s["name"], s["status"], s["to_model"]) for s in steps] == [("default", "succeeded", TINY), (SECOND, "succeeded", TINY)]
    assert steps[1]["started"] >= steps[0]["finished"]
    assert {row["model_name"] for row in answers.values()} == {TINY, SMALL}
