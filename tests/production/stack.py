"""The production stack's servers for tests: a private Redis and a PostgreSQL database of the test's own.

Neither touches services already running: Redis is a new redis-server on a free port; PostgreSQL is a
fresh database on the machine's server (127.0.0.1:5432, trust auth), dropped afterwards. Where a server
cannot be had, the tests fail at once with a sentence saying what is missing.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.site import Site
from harness.tabby_server import ROOT, free_port
from tests.models_admin.live import wait_until

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; `make test` installs Debian's redis-server package.")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_redis(port, process)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_for_redis(port: int, process: subprocess.Popen[bytes]) -> None:
    import redis

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"redis-server exited with {process.returncode} on port {port}.")
        try:
            if redis.Redis(port=port, socket_connect_timeout=0.5).ping():
                return
        except redis.RedisError:
            time.sleep(0.05)
    pytest.fail(f"redis-server did not answer on port {port} within 15 s.")


@contextmanager
def private_database() -> Iterator[str]:
    import psycopg

    name = f"gantry_test_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at 127.0.0.1:5432 as user postgres (trust auth): {exc}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_celery(site: Site, name: str, *args: str) -> subprocess.Popen[bytes]:
    """`python -m celery -A gantry <args>` with the site's environment; the site stops it at the end."""
    with (site.workdir / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "gantry", *args, "--loglevel", "INFO"],
            cwd=ROOT,
            env=site.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    site.processes.append(process)
    return process


def start_worker(site: Site, name: str, timeout: float = 60) -> subprocess.Popen[bytes]:
    """A real Celery worker (thread pool), returned once it says it is ready."""
    worker = start_celery(site, name, "worker", "--pool", "threads", "--concurrency", "4", "--hostname", f"{name}@%h")
    log_path = site.workdir / f"{name}.log"

    def ready() -> bool:
        assert worker.poll() is None, f"The worker exited with {worker.returncode}:\n{log_path.read_text()}"
        return f"{name}@" in (text := log_path.read_text(errors="replace")) and " ready." in text

    wait_until(ready, timeout, f"the Celery worker {name} to be ready")
    return worker
