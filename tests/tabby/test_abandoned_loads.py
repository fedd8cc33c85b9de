"""A load whose client goes away keeps running and keeps the load lock, as in TabbyAPI: the model server
the site's tests run against behaves like the real one when a switch stops waiting for a load."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.tabby_server import TabbyServer, load_events, run_tabby, wait_loaded
from tests.tabby.conftest import SMALL, TINY

DISCONNECTED = "Model load request disconnected. The load will continue."
# 200 MB at 60 MB/s: the load of the small model takes about three and a half seconds.
SLOW = {"load_throttle_mbps": 60}


@pytest.fixture(scope="module")
def server(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    """The tiny model loaded; load streams ping every second (as the recordings' server C)."""
    config = {"model": {"model_name": TINY}, "network": {"sse_ping_interval": 1}, "developer": {"cpu_threads": 1}}
    with run_tabby(tmp_path_factory.mktemp("tabby"), demo_models, config=config) as server:
        wait_loaded(server, TINY)
        yield server


def start_and_leave(server: TabbyServer, name: str, **body: Any) -> dict[str, Any]:
    """POST /v1/model/load, read the first progress event, then close the connection."""
    with server.client(admin=True, timeout=60) as client:
        with client.stream("POST", "/v1/model/load", json={"model_name": name, **body}) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
    return dict(json.loads(first[len("data: ") :]))


def timed_lines(server: TabbyServer, name: str) -> tuple[float, list[tuple[float, str]]]:
    """A second load of `name`: when its headers came, and each non-empty line with when it came."""
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    with server.client(admin=True, timeout=60) as client:
        with client.stream("POST", "/v1/model/load", json={"model_name": name}) as response:
            assert response.status_code == 200
            opened = time.monotonic() - started
            lines = [(time.monotonic() - started, line) for line in response.iter_lines() if line]
    return opened, lines


def loaded(server: TabbyServer) -> str | None:
    response = httpx.get(server.url + "/v1/model", headers=server.headers(), timeout=10)
    return str(response.json()["id"]) if response.status_code == 200 else None


def wait_for(server: TabbyServer, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while loaded(server) != name:
        assert time.monotonic() < deadline, f"{name} was not loaded within {timeout:g} s:\n{server.log()}"
        time.sleep(0.1)


def test_a_load_whose_client_went_away_goes_on_and_a_second_load_waits_behind_it(server: TabbyServer) -> None:
    wait_for(server, TINY)
    first = start_and_leave(server, SMALL, **SLOW)
    assert first == {"model_type": "model", "module": 1, "modules": 31, "status": "processing"}
    assert loaded(server) is None  # the abandoned load runs: it looks like nothing loaded

    opened, lines = timed_lines(server, TINY)
    events = [json.loads(line[len("data: ") :]) for _, line in lines if line.startswith("data: ")]
    first_event_at = next(at for at, line in lines if line.startswith("data: "))
    pings = [line for at, line in lines if at < first_event_at]
    assert opened < 1.0, "the second load's stream opens at once"
    assert pings and all(line.startswith(": ping - ") for line in pings), lines
    assert first_event_at > 1.5, "the second load waited for the first one to end"
    assert events[-1] == {"model_type": "model", "module": events[-1]["modules"], "modules": events[-1]["modules"], "status": "finished"}
    assert loaded(server) == TINY
    log = server.log()
    assert DISCONNECTED in log
    # The abandoned load ran to its end before the waiting one began.
    assert log.index(f"Loaded {SMALL}") < log.rindex(f"Loading {TINY}")


def test_asking_again_for_the_model_being_loaded_answers_once_that_load_ends(server: TabbyServer) -> None:
    assert load_events(server, TINY)[-1]["status"] == "finished"
    start_and_leave(server, SMALL, **SLOW)
    opened, lines = timed_lines(server, SMALL)
    events = [json.loads(line[len("data: ") :]) for _, line in lines if line.startswith("data: ")]
    assert opened < 1.0
    assert events == [
        {"model_type": "model", "module": 1, "modules": 1, "status": "processing"},
        {"model_type": "model", "module": 1, "modules": 1, "status": "finished"},
    ]
    assert lines[0][1].startswith(": ping - ")
    assert loaded(server) == SMALL
