from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tabby.demo import make_demo_models
from tests.tabby.server import DEMO_MODELS, TabbyServer, run_tabby, wait_loaded

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
LARGE = "Large-Chat-1G"


@pytest.fixture(scope="session")
def demo_models() -> Path:
    """The demo models (made once; `make test` has usually made them already)."""
    make_demo_models(DEMO_MODELS, log=lambda line: None)
    return DEMO_MODELS


@pytest.fixture(scope="module")
def tiny_server(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    """A server with the tiny demo model loaded, shared by a test module."""
    with run_tabby(tmp_path_factory.mktemp("tabby"), demo_models, config={"model": {"model_name": TINY}}) as server:
        wait_loaded(server, TINY)
        yield server
