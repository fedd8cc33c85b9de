"""The README's production setup: a TLS proxy (Debian's nginx, running `deploy/nginx.conf.example` with a
self-signed certificate) in front of daphne, on PostgreSQL and Redis with a Celery worker, the site told
to trust the proxy's headers (TRUST_PROXY_HEADERS=true) and to send its cookies over HTTPS only. Every
cookie-authenticated write works through it, sockets too, and a real Chromium chats and switches models.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, WebSocket, expect, sync_playwright
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.e2e.conftest import CHROMIUM, CHROMIUM_FLAGS, TIMEOUT_MS, log_in
from tests.models_admin.live import started_together
from tests.production.proxy import Proxy, run_nginx
from tests.production.stack import private_database, private_redis, start_worker

TINY = "Tiny-Chat-5M"
TINY_V2 = "Tiny-Chat-5M-v2"  # the same weights in a second folder: a switch to load
SWITCHED = "✓ Model switched successfully!"


@dataclass
class Proxied:
    site: Site  # daphne, reached directly only by the proxy
    proxy: Proxy  # https://127.0.0.1:<port>, what browsers use
    tabby: TabbyServer


@pytest.fixture(scope="module")
def proxied(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    folder = tmp_path_factory.mktemp("models")
    for name in (TINY, TINY_V2):
        (folder / name).symlink_to(demo_models / TINY, target_is_directory=True)
    workdir = tmp_path_factory.mktemp("behind-a-proxy")
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SECRET_KEY": "production-test-secret-key",
            "TRUST_PROXY_HEADERS": "true",
            "SESSION_COOKIE_SECURE": "true",
            "GANTRY_MAX_ANSWER_TOKENS": "40",
        }
        port = free_port()
        config = {"model": {"model_name": TINY}, "developer": {"cpu_threads": 1}}
        with started_together(
            run_tabby(tmp_path_factory.mktemp("tabby"), folder, config=config, port=port),
            run_site(workdir, f"http://127.0.0.1:{port}", extra_env=env),
        ) as (tabby, site):
            start_worker(site, "worker-1")
            wait_loaded(tabby, TINY)
            with run_nginx(workdir / "nginx", site.url) as proxy:
                yield Proxied(site, proxy, tabby)


@contextmanager
def browser_like(proxied: Proxied, user: tuple[str, str]) -> Iterator[httpx.Client]:
    """A logged-in client that writes as the pages do: the page's Origin and the CSRF token."""
    proxy = proxied.proxy
    with httpx.Client(base_url=proxy.url, verify=proxy.tls(), timeout=120, headers={"Origin": proxy.url}) as client:
        response = client.post("/api/auth/login", json={"username": user[0], "password": user[1]})
        assert response.status_code == 200, response.text
        client.get("/")  # the page sets the CSRF cookie its script sends back
        client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
        yield client


def wait_for_answer(client: httpx.Client, conversation: int, timeout: float = 90) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        messages: list[dict[str, Any]] = client.get(f"/api/conversations/{conversation}/messages/").json()
        if [m["status"] for m in messages] == ["done", "done"]:
            return messages
        assert time.monotonic() < deadline, messages
        time.sleep(0.2)


def test_every_cookie_authenticated_write_works_through_the_proxy(proxied: Proxied) -> None:
    with browser_like(proxied, MEMBER) as member, browser_like(proxied, ADMIN) as admin:
        created = member.post("/api/conversations/", json={"title": "Through TLS"})
        conversation = created.json()["id"]
        unloaded = admin.post("/api/admin/models/unload")  # so the next message waits, to be stopped
        posted = member.post(f"/api/conversations/{conversation}/messages/", json={"content": "Hello through TLS"})
        stopped = member.post(f"/api/messages/{posted.json()['id']}/stop/")
        retried = member.post(f"/api/messages/{posted.json()['id']}/retry/")
        renamed = member.patch(f"/api/conversations/{conversation}/", json={"title": "Renamed through TLS"})
        switched = admin.post("/api/admin/models/switch", json={"model_id": TINY_V2})
        answered = wait_for_answer(member, conversation)
        refreshed = admin.post("/api/admin/models/refresh")
        deleted = member.delete(f"/api/conversations/{conversation}/")
        foreign = member.post("/api/conversations/", json={}, headers={"Origin": "https://evil.example"})
        downgraded = member.post("/api/conversations/", json={}, headers={"Origin": proxied.proxy.url.replace("https", "http")})
        logged_out = member.post("/api/auth/logout")
    statuses = {
        "create": created.status_code,
        "unload": unloaded.status_code,
        "post": posted.status_code,
        "stop": stopped.status_code,
        "retry": retried.status_code,
        "rename": renamed.status_code,
        "switch": switched.status_code,
        "refresh": refreshed.status_code,
        "delete": deleted.status_code,
        "logout": logged_out.status_code,
    }
    assert statuses == {
        "create": 201, "unload": 200, "post": 202, "stop": 200, "retry": 202,
        "rename": 200, "switch": 200, "refresh": 200, "delete": 204, "logout": 200,
    }, {name: r.text for name, r in zip(statuses, (created, unloaded, posted, stopped, retried, renamed, switched))}  # fmt: skip
    assert stopped.json()["status"] == "cancelled"
    assert switched.json() == {"message": f"Model switched to {TINY_V2}", "model_id": TINY_V2}
    assert answered[0]["id"] == posted.json()["id"]  # the stopped then retried message, answered by the new model
    assert (foreign.status_code, downgraded.status_code) == (403, 403)  # the origin check still holds


def test_a_pages_socket_through_the_proxy_sends_and_streams(proxied: Proxied) -> None:
    proxy = proxied.proxy
    with browser_like(proxied, MEMBER) as member:
        conversation = member.post("/api/conversations/", json={}).json()["id"]
        url = proxy.url.replace("https://", "wss://") + f"/ws/chat/{conversation}/"
        headers = {"Cookie": f"session_id={member.cookies['session_id']}"}
        events: list[dict[str, Any]] = []
        with connect(url, ssl=proxy.tls(), origin=Origin(proxy.url), additional_headers=headers, open_timeout=10) as socket:
            socket.send(json.dumps({"type": "chat.send", "ref": 1, "content": "Hello over wss"}))
            while not events or events[-1]["type"] != "chat.done":
                events.append(json.loads(socket.recv(timeout=60)))
        plain_page = Origin(proxy.url.replace("https", "http"))
        with (
            pytest.raises(InvalidStatus) as refused,
            connect(url, ssl=proxy.tls(), origin=plain_page, additional_headers=headers),
        ):
            pass
    sent = next(e for e in events if e["type"] == "chat.sent")
    assert sent["ref"] == 1 and sent["message"]["content"] == "Hello over wss"
    assert [e for e in events if e["type"] == "chat.token"]
    assert refused.value.response.status_code == 403


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}; `make test` installs Debian's chromium package.", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=60_000)
        yield browser
        browser.close()


def test_a_browser_chats_and_an_admin_switches_through_the_proxy(browser: Browser, proxied: Proxied) -> None:
    active = httpx.get(f"{proxied.tabby.url}/v1/model", headers=proxied.tabby.headers(admin=True)).json()["id"]
    target = TINY if active == TINY_V2 else TINY_V2
    contexts = [
        browser.new_context(base_url=proxied.proxy.url, ignore_https_errors=True, viewport={"width": 1280, "height": 800})
        for _ in range(2)
    ]
    try:
        for context in contexts:
            context.set_default_timeout(TIMEOUT_MS)
        chat, dashboard = (context.new_page() for context in contexts)
        sent_frames: list[str] = []
        chat.on("websocket", lambda socket: record_sent(socket, sent_frames))

        log_in(chat, MEMBER)
        assert chat.url.startswith("https://")
        chat.get_by_label("Message").fill("Hello from a browser behind TLS")
        chat.get_by_label("Message").press("Enter")
        answer = chat.locator("#messages .message.assistant")
        expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=90_000)
        assert (answer.locator(".body").text_content() or "").strip()
        assert any('"chat.send"' in frame for frame in sent_frames), sent_frames  # sent over the wss socket

        log_in(dashboard, ADMIN)
        dashboard.goto("/admin/models/")
        expect(dashboard.locator("#dashboard")).to_have_attribute("data-live", "true")  # its wss socket is open
        dashboard.locator(f'#model-rows tr[data-model="{target}"]').get_by_role("button", name="Switch").click()
        dashboard.locator("#confirm-dialog").get_by_role("button", name="Confirm").click()
        expect(dashboard.locator("#progress-text")).to_have_text(SWITCHED, timeout=90_000)
        expect(dashboard.locator(f'#model-rows tr[data-model="{target}"] .status-cell')).to_have_text("Active")
        expect(chat.locator("#model-name")).to_have_text(target)  # the chat page heard it over its socket
    finally:
        for context in contexts:
            context.close()


def record_sent(socket: WebSocket, frames: list[str]) -> None:
    socket.on("framesent", lambda payload: frames.append(payload if isinstance(payload, str) else payload.decode()))
