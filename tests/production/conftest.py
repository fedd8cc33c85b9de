from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from harness.site import Site, run_site, start_daphne
from harness.tabby_server import TabbyServer, free_port
from tests.production.stack import private_database, private_redis


@dataclass
class ProductionSite:
    site: Site
    other_url: str  # a second daphne process, meeting the first in Redis and PostgreSQL
    redis_url: str


@pytest.fixture(scope="module")
def production(tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionSite]:
    workdir = tmp_path_factory.mktemp("production")
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "SECRET_KEY": "production-test-secret-key"}
        with run_site(workdir, tabby.url, extra_env=env) as site:
            port = free_port()
            start_daphne(site, port, name="daphne-2")
            yield ProductionSite(site, f"http://127.0.0.1:{port}", redis_url)
