from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.tabby_server import TabbyServer, run_tabby, wait_loaded

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
LARGE = "Large-Chat-1G"


@pytest.fixture(scope="module")
def tiny_server(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    """A server with the tiny demo model loaded, shared by a test module."""
    with run_tabby(tmp_path_factory.mktemp("tabby"), demo_models, config={"model": {"model_name": TINY}}) as server:
        wait_loaded(server, TINY)
        yield server
