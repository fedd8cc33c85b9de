"""Production mode: a user's sockets across web processes (daphne) meeting in Redis and PostgreSQL. A
session's end closes them in every process; the number a user may open counts them all; the places of
a process that dies come back. Two processes with a one-minute heartbeat (what closes within seconds there
is the session's end itself) and, where a test needs it, one with a heartbeat of two seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from harness.site import BlockingConnection, Site, run_site, start_daphne, stop
from harness.tabby_server import TabbyServer, free_port
from tests.production.stack import private_database, private_redis

CAP = 2
QUICK_HEARTBEAT = 2  # seconds; a place is held three of them without a renewal


@dataclass
class Stack:
    site: Site  # the first web process
    other_url: str  # the second


@pytest.fixture(scope="module")
def stack(tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("sockets")
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SECRET_KEY": "production-test-secret-key",
            "GANTRY_MAX_SOCKETS_PER_USER": str(CAP),
            "GANTRY_SOCKET_HEARTBEAT": "60",
        }
        with run_site(workdir, tabby.url, extra_env=env) as site:
            port = free_port()
            start_daphne(site, port, name="daphne-2")
            yield Stack(site, f"http://127.0.0.1:{port}")


@contextmanager
def quick_process(site: Site, name: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Another web process of the same site, its sockets beating every QUICK_HEARTBEAT seconds."""
    quick = Site(site.url, {**site.env, "GANTRY_SOCKET_HEARTBEAT": str(QUICK_HEARTBEAT)}, site.workdir)
    port = free_port()
    process = start_daphne(quick, port, name=name)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop(process)


def new_user(site: Site, name: str, admin: bool = False) -> tuple[str, str]:
    password = f"{name}-password-1"
    site.manage("ensure_user", name, "--password", password, *(["--admin"] if admin else []))
    return name, password


@contextmanager
def page_socket(url: str, path: str, client: httpx.Client) -> Iterator[BlockingConnection]:
    """A page's socket on the web process at `url` (the process's own origin), its first event received."""
    headers = {"Cookie": f"session_id={client.cookies['session_id']}", "Origin": url}
    with connect("ws" + url.removeprefix("http") + path, additional_headers=headers, open_timeout=10) as socket:
        assert json.loads(socket.recv(timeout=10))["type"] == "model.state"
        yield socket


def close_code(socket: BlockingConnection, timeout: float = 15) -> int | None:
    """How the server closed the socket (events coming before are skipped); fails if it stays open."""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                socket.recv(timeout=left)
            except TimeoutError:
                break
    except ConnectionClosed:
        return socket.close_code
    raise AssertionError(f"The socket was still open after {timeout:g} s.")


def try_socket(sockets: ExitStack, url: str, path: str, client: httpx.Client) -> BlockingConnection | None:
    """The page's socket (closed with `sockets`), or None when it is refused (403)."""
    try:
        return sockets.enter_context(page_socket(url, path, client))
    except InvalidStatus as refused:
        assert refused.response.status_code == 403
        return None


def socket_within(sockets: ExitStack, url: str, path: str, client: httpx.Client, seconds: float) -> BlockingConnection:
    """The page's socket, tried until it opens; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while (socket := try_socket(sockets, url, path, client)) is None:
        assert time.monotonic() < deadline, f"No socket could be opened within {seconds:g} s."
        time.sleep(0.2)
    return socket


CHANGES = {
    "password set": "user.set_password('set-by-an-operator-9'); user.save()",
    "deactivated": "user.is_active = False; user.save()",
    "deleted": "user.delete()",
}


@pytest.mark.parametrize("change", CHANGES)
def test_an_account_changed_in_another_process_closes_its_sockets_in_every_web_process(stack: Stack, change: str) -> None:
    name = f"changed-{change.split()[0]}"
    user = new_user(stack.site, name, admin=True)
    with stack.site.session(user) as client, ExitStack() as sockets:
        opened = [
            sockets.enter_context(page_socket(stack.site.url, "/ws/chat/", client)),
            sockets.enter_context(page_socket(stack.other_url, "/ws/models/", client)),
        ]
        # A management command: a process of its own, reaching the web processes through Redis only.
        code = f"from django.contrib.auth import get_user_model; user = get_user_model().objects.get(username={name!r}); "
        stack.site.manage("shell", "-c", code + CHANGES[change])
        codes = [close_code(socket) for socket in opened]
        after = client.get("/api/conversations/")
    assert codes == [4401, 4401]
    assert after.status_code == 401


def test_logging_out_in_one_process_closes_the_sessions_sockets_in_the_other(stack: Stack) -> None:
    user = new_user(stack.site, "leaving")
    with stack.site.session(user) as client, page_socket(stack.other_url, "/ws/chat/", client) as socket:
        assert client.post("/api/auth/logout").status_code == 200
        assert close_code(socket) == 4401


def test_the_sockets_a_user_may_open_are_counted_across_processes_and_a_dead_ones_come_back(stack: Stack) -> None:
    user, other = new_user(stack.site, "counted"), new_user(stack.site, "uncounted")
    with stack.site.session(user) as client, stack.site.session(other) as other_client, ExitStack() as sockets:
        first = sockets.enter_context(page_socket(stack.site.url, "/ws/chat/", client))
        with quick_process(stack.site, "daphne-doomed") as (doomed_url, doomed):
            try_socket(sockets, doomed_url, "/ws/chat/", client)
            refused_while_both_open = try_socket(sockets, stack.other_url, "/ws/chat/", client)
            others_own = try_socket(sockets, stack.other_url, "/ws/chat/", other_client)
            doomed.send_signal(signal.SIGKILL)  # its socket dies without a word: nothing gives its place back
            doomed.wait()
        # Its place was leased for three heartbeats and is not renewed any more.
        socket_within(sockets, stack.other_url, "/ws/chat/", client, 3 * QUICK_HEARTBEAT + 10)
        first.close()
        # A socket closed as usual gives its place back then (its lease would run three minutes here).
        socket_within(sockets, stack.other_url, "/ws/chat/", client, 5)
    assert refused_while_both_open is None
    assert others_own is not None  # the count is per user


def test_a_socket_whose_session_ended_without_a_word_closes_at_its_next_heartbeat(stack: Stack) -> None:
    user = new_user(stack.site, "silenced")
    with (
        stack.site.session(user) as client,
        quick_process(stack.site, "daphne-quick") as (quick_url, _),
        page_socket(quick_url, "/ws/chat/", client) as socket,
    ):
        # An update sends no signal: only the socket's own heartbeat can find that its session is gone.
        stack.site.manage("shell", "-c", (
            "from django.contrib.auth import get_user_model; from django.contrib.auth.hashers import make_password; "
            "get_user_model().objects.filter(username='silenced').update(password=make_password('elsewhere-4'))"
        ))  # fmt: skip
        assert close_code(socket, timeout=QUICK_HEARTBEAT + 10) == 4401
