"""A live site and its live model server, for the switching tests (embedded and production): starting
them side by side, reading what Gantry recorded (the site's database), checking it agrees with TabbyAPI."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

from harness.site import Site
from harness.tabby_server import TabbyServer, free_port, run_tabby

T = TypeVar("T")


@contextmanager
def started_together(*servers: AbstractContextManager[Any]) -> Iterator[list[Any]]:
    """Enter the servers' context managers at the same time (each waits for its own server); exit them in reverse.

    A site started beside its model server may find it not up yet: its first refresh then fails quietly,
    and the next one (or the first switch, which refreshes an unknown model's list) takes the list.
    """
    with ExitStack() as stack:
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            futures = [pool.submit(server.__enter__) for server in servers]
        for server, future in zip(servers, futures):
            if future.exception() is None:
                stack.push(server.__exit__)
        for future in futures:
            if (error := future.exception()) is not None:
                raise error
        yield [future.result() for future in futures]


def query(site: Site, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Read the site's database (its SQLite file, or PostgreSQL in production). Placeholders are `?`."""
    if database_url := site.env.get("DATABASE_URL"):
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()  # type: ignore[arg-type]
    with closing(sqlite3.connect(f"file:{site.workdir / 'gantry.sqlite3'}?mode=ro", uri=True, timeout=20)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(sql, params).fetchall()]


def backend(site: Site) -> dict[str, Any]:
    """The backend row: `state`, `active_model`, `target_model`, `operation_id`."""
    rows = query(site, "SELECT state, active_model, target_model, operation_id FROM models_admin_backend WHERE name = 'default'")
    return rows[0] if rows else {"state": "unloaded", "active_model": "", "target_model": "", "operation_id": None}


def operations(site: Site) -> list[dict[str, Any]]:
    """Every recorded switch and unload, newest first."""
    return query(
        site,
        "SELECT id, kind, status, from_model, to_model, error, error_kind, rolled_back FROM models_admin_operation ORDER BY id DESC",
    )


def loaded_model(tabby: TabbyServer | None) -> str | None:
    """What TabbyAPI's `GET /v1/model` says is loaded (None: nothing, or no server to ask)."""
    if tabby is None:
        return None
    response = httpx.get(tabby.url + "/v1/model", headers=tabby.headers(), timeout=10)
    if response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def disagreement(site: Site, admin: httpx.Client, tabby: TabbyServer | None) -> str | None:
    """How Gantry's state (database and `GET /api/admin/models`) differs from what TabbyAPI serves; None if it agrees.

    Agreeing also means that no operation is left running and that the backend is not stuck in a busy state.
    """
    served = loaded_model(tabby)
    recorded = backend(site)
    running = [op for op in operations(site) if op["status"] == "running"]
    listed = admin.get("/api/admin/models")
    assert listed.status_code == 200, listed.text
    active = [model["id"] for model in listed.json()["models"] if model["active"]]
    # No server to ask (`tabby` None): Gantry must say it cannot reach it, not that nothing is loaded.
    states = {"ready"} if served else {"unloaded", "failed"} if tabby is not None else {"unreachable"}
    if (
        running
        or recorded["state"] not in states
        or (recorded["active_model"] or None) != served
        or active != ([served] if served else [])
    ):
        return f"TabbyAPI serves {served}; Gantry's backend is {recorded}, the API lists {active} as active; running: {running}"
    return None


def wait_until(check: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `check` until it returns something truthy; fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"Waited {timeout:g} s for {what}.")
        time.sleep(0.1)


class RestartableTabby:
    """A model server on one port that a test stops, freezes (SIGSTOP) and starts again, each start with
    the config it is given (the site keeps pointing at the same address)."""

    def __init__(self, workdir: Path, model_dir: Path) -> None:
        self.workdir, self.model_dir = workdir, model_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: TabbyServer | None = None
        self._running: ExitStack | None = None

    def start(self, config: dict[str, Any]) -> TabbyServer:
        """Start it (waiting for /health, not for a model to load) unless it runs."""
        if self.server is None:
            with ExitStack() as stack:
                self.server = stack.enter_context(run_tabby(self.workdir, self.model_dir, config=config, port=self.port))
                self._running = stack.pop_all()
        return self.server

    def stop(self) -> None:
        """Stop it as an operator does (SIGINT, then wait for it to exit)."""
        if self._running is not None:
            self.thaw()
            self._running.close()
        self.server, self._running = None, None

    def freeze(self) -> None:
        assert self.server is not None
        os.kill(self.server.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.server is not None and self.server.process.poll() is None:
            os.kill(self.server.process.pid, signal.SIGCONT)
