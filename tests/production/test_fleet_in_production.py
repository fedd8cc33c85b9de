"""Production mode with a fleet: two real model servers, two daphne processes, a Celery worker and Celery
beat on a private Redis and PostgreSQL. A server killed mid-answer: the answer completes on the other,
the killed one is `down` within 5 s, and on its return the worker loads its desired model again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.site import Site, run_site, start_daphne
from harness.tabby_server import free_port
from tests.models_admin.fleet_live import Pair, add_second, killed_mid_answer, started_pair
from tests.production.stack import private_database, private_redis, start_celery, start_worker


@pytest.fixture(scope="module")
def pair(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with started_pair(tmp_path_factory.mktemp("fleet"), demo_models) as servers:
        yield servers


@pytest.fixture(scope="module")
def site(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("production")
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "SECRET_KEY": "production-test-secret-key"}
        with run_site(workdir, pair.first.url, extra_env=env) as site:
            start_daphne(site, free_port(), name="daphne-2")
            start_celery(site, "beat", "beat", "--schedule", str(workdir / "beat-schedule"))
            start_worker(site, "worker-1")
            add_second(site, pair.second.url)
            yield site


async def test_a_backend_killed_mid_answer_fails_over_and_comes_back_in_production(site: Site, pair: Pair) -> None:
    await killed_mid_answer(site, pair)
