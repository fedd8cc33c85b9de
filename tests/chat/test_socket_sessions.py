"""A page's socket lives no longer than its session, and a user has a bounded number of them, on the live
site (daphne, embedded). Its heartbeat is a minute here, so what closes a socket within seconds is the
session's end itself. Across processes: tests/production/test_sockets_across_processes.py."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness.site import ADMIN, Site, receive_until, run_site
from harness.tabby_server import TabbyServer

CAP = 3
SESSION_GONE = "Your session has ended (you logged out, your password changed or your account was deactivated). Log in again."


@pytest.fixture(scope="module")
def site(tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    env = {"GANTRY_MAX_SOCKETS_PER_USER": str(CAP), "GANTRY_SOCKET_HEARTBEAT": "60"}
    with run_site(tmp_path_factory.mktemp("site"), tabby.url, extra_env=env) as site:
        yield site


def new_user(site: Site, name: str, admin: bool = False) -> tuple[str, str]:
    password = f"{name}-password-1"
    site.manage("ensure_user", name, "--password", password, *(["--admin"] if admin else []))
    return name, password


@asynccontextmanager
async def opened(site: Site, path: str, client: httpx.Client) -> AsyncIterator[ClientConnection]:
    """A page's socket, once its first event (the model's state) came."""
    async with site.socket(path, client) as socket:
        assert json.loads(await socket.recv())["type"] == "model.state"
        yield socket


async def close_code(socket: ClientConnection, timeout: float = 10) -> int | None:
    """How the server closed the socket (events still coming before are skipped)."""
    try:
        await receive_until(socket, lambda event: False, timeout=timeout)
    except ConnectionClosed:
        pass
    assert socket.close_code is not None, "The socket is still open."
    return socket.close_code


async def alive(socket: ClientConnection) -> dict[str, Any]:
    """A sidebar socket answers a message it cannot take: proof that it is open and its session holds."""
    await socket.send(json.dumps({"type": "chat.send", "ref": "ping", "content": "Hello"}))
    return (await receive_until(socket, lambda event: event["type"] in {"chat.sent", "chat.refused"}))[-1]


SIDEBAR_REPLY = {"type": "chat.refused", "ref": "ping", "detail": "Open a conversation to send a message."}


async def test_logging_out_closes_that_sessions_sockets_and_no_other(site: Site) -> None:
    user = new_user(site, "leaver")
    with site.session(user) as first, site.session(user) as second:
        conversation = first.post("/api/conversations/", json={}).json()
        async with (
            opened(site, f"/ws/chat/{conversation['id']}/", first) as chat,
            opened(site, "/ws/chat/", first) as sidebar,
            opened(site, "/ws/chat/", second) as elsewhere,
        ):
            assert first.post("/api/auth/logout").status_code == 200
            codes = [await close_code(chat), await close_code(sidebar)]
            reply = await alive(elsewhere)
        after = first.get("/api/conversations/")
    assert codes == [4401, 4401]  # the page reloads, onto the login page
    assert reply == SIDEBAR_REPLY
    assert after.status_code == 401


async def test_logging_out_with_the_page_closes_the_admins_dashboard_socket(site: Site) -> None:
    admin = new_user(site, "leaving-admin", admin=True)
    with site.session(admin) as client:
        page = client.get("/admin/models/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert token, page.text
        async with opened(site, "/ws/models/", client) as dashboard:
            logged_out = client.post("/logout/", data={"csrfmiddlewaretoken": token.group(1)})
            code = await close_code(dashboard)
    assert logged_out.status_code == 302
    assert code == 4401


def user_id(site: Site, name: str) -> int:
    code = f"from django.contrib.auth import get_user_model; print(get_user_model().objects.get(username={name!r}).pk)"
    return int(site.manage("shell", "-c", code).split()[-1])


def set_password_in_the_admin_site(site: Site, admin: httpx.Client, target: int, password: str) -> httpx.Response:
    form = admin.get(f"/django-admin/auth/user/{target}/password/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    assert token, form.text
    data = {"csrfmiddlewaretoken": token.group(1), "usable_password": "true", "password1": password, "password2": password}
    return admin.post(f"/django-admin/auth/user/{target}/password/", data=data)


async def test_a_password_changed_in_the_admin_site_closes_every_socket_of_the_user(site: Site) -> None:
    user, bystander = new_user(site, "changer"), new_user(site, "bystander")
    target = user_id(site, "changer")
    with site.session(user) as first, site.session(user) as second, site.session(bystander) as third:
        async with AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(opened(site, "/ws/chat/", c)) for c in (first, second, third)]
            with site.session(ADMIN) as admin:
                changed = set_password_in_the_admin_site(site, admin, target, "a-brand-new-password-2")
            codes = [await close_code(s) for s in sockets[:2]]
            bystanders_reply = await alive(sockets[2])
        old_session = first.get("/api/conversations/")
    assert changed.status_code == 302, changed.text
    assert codes == [4401, 4401]
    assert bystanders_reply == SIDEBAR_REPLY  # another user's sockets stay open
    assert old_session.status_code == 401


async def test_a_message_sent_after_the_session_ended_silently_is_refused_and_the_socket_closes(site: Site) -> None:
    user = new_user(site, "quiet")
    with site.session(user) as client:
        conversation = client.post("/api/conversations/", json={}).json()
        async with opened(site, f"/ws/chat/{conversation['id']}/", client) as socket:
            # Changed by another process, with no signal (an update): nothing told the site.
            site.manage("shell", "-c", (
                "from django.contrib.auth import get_user_model; from django.contrib.auth.hashers import make_password; "
                "get_user_model().objects.filter(username='quiet').update(password=make_password('changed-elsewhere-3'))"
            ))  # fmt: skip
            await socket.send(json.dumps({"type": "chat.send", "ref": 1, "content": "Still there?"}))
            reply = (await receive_until(socket, lambda event: event["type"] in {"chat.sent", "chat.refused"}))[-1]
            code = await close_code(socket)
    with site.session((user[0], "changed-elsewhere-3")) as again:
        history = again.get(f"/api/conversations/{conversation['id']}/messages/").json()
    assert reply == {"type": "chat.refused", "ref": 1, "detail": SESSION_GONE}
    assert code == 4401
    assert history == []


@asynccontextmanager
async def opened_once_freed(site: Site, client: httpx.Client, timeout: float = 5) -> AsyncIterator[ClientConnection]:
    """A socket opened as soon as the place of one just closed is given back (the server does that after
    the close handshake, so the very next attempt may come first)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with AsyncExitStack() as stack:
        while True:
            try:
                socket = await stack.enter_async_context(opened(site, "/ws/chat/", client))
                break
            except InvalidStatus:
                assert asyncio.get_running_loop().time() < deadline, "The closed socket's place was not given back."
                await asyncio.sleep(0.05)
        yield socket


async def test_a_user_may_have_only_so_many_sockets_open(site: Site) -> None:
    user, other = new_user(site, "many-tabs"), new_user(site, "one-tab")
    with site.session(user) as client, site.session(other) as other_client:
        async with AsyncExitStack() as stack:
            tabs = [await stack.enter_async_context(opened(site, "/ws/chat/", client)) for _ in range(CAP)]
            with pytest.raises(InvalidStatus) as refused:
                await stack.enter_async_context(opened(site, "/ws/chat/", client))
            async with opened(site, "/ws/chat/", other_client) as others:
                others_reply = await alive(others)
            await tabs[0].close()
            reopened = await stack.enter_async_context(opened_once_freed(site, client))
            replies = [await alive(s) for s in (*tabs[1:], reopened)]
    assert refused.value.response.status_code == 403
    assert others_reply == SIDEBAR_REPLY  # the count is per user
    assert replies == [SIDEBAR_REPLY] * CAP
