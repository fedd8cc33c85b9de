"""Run the real Gantry site (daphne) as a process on loopback, for integration and browser tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.sync.client import ClientConnection as BlockingConnection
from websockets.sync.client import connect as connect_blocking
from websockets.typing import Origin

from harness.tabby_server import ADMIN_KEY, API_KEY, ROOT, free_port

ADMIN = ("admin", "admin-password-1")
MEMBER = ("member", "member-password-1")
OUTSIDER = ("outsider", "outsider-password-1")


@dataclass
class Site:
    url: str
    env: dict[str, str]
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args], check=False, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    @contextmanager
    def session(self, user: tuple[str, str]) -> Iterator[httpx.Client]:
        """An HTTP client holding a real session of `user` (the `session_id` cookie)."""
        with httpx.Client(base_url=self.url, timeout=60) as client:
            response = client.post("/api/auth/login", json={"username": user[0], "password": user[1]})
            assert response.status_code == 200, response.text
            assert "session_id" in client.cookies
            yield client

    @asynccontextmanager
    async def socket(
        self, path: str, client: httpx.Client | None = None, origin: str | None = None
    ) -> AsyncIterator[ClientConnection]:
        """A real WebSocket to `path`, as a page of this site opens it: the session's cookie, the site's Origin."""
        cookie = {"Cookie": f"session_id={client.cookies['session_id']}"} if client is not None else {}
        url = "ws" + self.url.removeprefix("http") + path
        async with connect(url, origin=Origin(origin or self.url), additional_headers=cookie, proxy=None) as socket:
            yield socket

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log")))


async def receive_until(
    socket: ClientConnection, last: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> list[dict[str, Any]]:
    """The socket's events up to and including the first one `last` accepts."""
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while not events or not last(events[-1]):
                events.append(json.loads(await socket.recv()))
    except TimeoutError:
        raise AssertionError(f"The awaited event did not come within {timeout:g} s; came: {events[-20:]}") from None
    return events


@contextmanager
def blocking_socket(url: str, path: str, session_id: str, timeout: float) -> Iterator[BlockingConnection]:
    """A blocking WebSocket to `path` of the site at `url`, opened as a page opens it (the session's cookie,
    the site's Origin), once its first event, the model's state, has come; `timeout` bounds both."""
    headers = {"Cookie": f"session_id={session_id}", "Origin": url}
    with connect_blocking("ws" + url.removeprefix("http") + path, additional_headers=headers, open_timeout=timeout) as socket:
        first = json.loads(socket.recv(timeout=timeout))
        assert first["type"] == "model.state", first
        yield socket


def receive_blocking(
    socket: BlockingConnection, last: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> list[dict[str, Any]]:
    """The blocking socket's events up to and including the first one `last` accepts."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while not events or not last(events[-1]):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"The awaited event did not come within {timeout:g} s; came: {events[-10:]}")
        try:
            events.append(json.loads(socket.recv(timeout=left)))
        except TimeoutError:
            continue
    return events


def site_env(workdir: Path, tabby_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TABBY_", "GANTRY_", "DATABASE_URL", "REDIS_URL"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "gantry.settings",
            "GANTRY_VAR_DIR": str(workdir),
            "TABBY_HOST": tabby_url,
            "TABBY_API_KEY": API_KEY,
            "TABBY_ADMIN_KEY": ADMIN_KEY,
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra or {})
    return env


def start_daphne(site: Site, port: int, name: str = "daphne") -> subprocess.Popen[bytes]:
    with (site.workdir / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "gantry.asgi:application"],
            cwd=ROOT,
            env=site.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    site.processes.append(process)
    wait_for(f"http://127.0.0.1:{port}/login/", process, site)
    return process


def wait_for(url: str, process: subprocess.Popen[bytes], site: Site, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The site exited with {process.returncode}:\n{site.log()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"The site did not answer {url} within {timeout:.0f} s:\n{site.log()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def run_site(workdir: Path, tabby_url: str, extra_env: dict[str, str] | None = None) -> Iterator[Site]:
    """Migrate a fresh database, create the cast (admin, member, outsider) and start daphne."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    site = Site(f"http://127.0.0.1:{port}", site_env(workdir, tabby_url, extra_env), workdir)
    site.manage("migrate", "--noinput")
    site.manage("ensure_user", ADMIN[0], "--password", ADMIN[1], "--admin")
    for name, password in (MEMBER, OUTSIDER):
        site.manage("ensure_user", name, "--password", password)
    try:
        start_daphne(site, port)
        yield site
    finally:
        for process in site.processes:
            stop(process)
