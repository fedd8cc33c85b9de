"""Behind a reverse proxy: with TRUST_PROXY_HEADERS=true, the scheme and the client's address come from
X-Forwarded-Proto and X-Forwarded-For, for HTTP and sockets; never without it. CSRF_TRUSTED_ORIGINS count
as this site, for writes and sockets alike. (Through a real nginx: tests/production/test_behind_a_tls_proxy.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from pytest_django.fixtures import Settings
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

import gantry.asgi
from gantry.proxy import as_the_proxy_saw_it
from harness.site import MEMBER, Site, run_site
from harness.tabby_server import TabbyServer

TRUSTED = "https://gantry.example.com"


def scope(kind: str, **headers: str) -> dict[str, Any]:
    encoded = [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    made: dict[str, Any] = {"type": kind, "path": "/", "headers": [(b"host", b"127.0.0.1:8000"), *encoded]}
    made["client"] = ("127.0.0.1", 50000)
    if kind == "http":
        made["scheme"] = "http"
    return made


def test_the_scheme_and_address_are_the_ones_the_proxy_saw() -> None:
    http = as_the_proxy_saw_it(scope("http", x_forwarded_proto="https", x_forwarded_for="203.0.113.9, 198.51.100.7"))
    socket = as_the_proxy_saw_it(scope("websocket", x_forwarded_proto="https", x_forwarded_for="198.51.100.7"))
    plain = as_the_proxy_saw_it(scope("websocket", x_forwarded_proto="http"))
    assert (http["scheme"], http["client"][0]) == ("https", "198.51.100.7")  # the address the proxy added: the last
    assert (socket["scheme"], socket["client"][0]) == ("wss", "198.51.100.7")
    assert (plain["scheme"], plain["client"][0]) == ("ws", "127.0.0.1")
    untouched = scope("http", x_forwarded_proto="gopher")
    assert as_the_proxy_saw_it(untouched) == untouched
    assert as_the_proxy_saw_it(scope("http")) == scope("http")


@pytest.mark.parametrize("trusted", [True, False])
async def test_the_entry_point_reads_the_proxys_headers_only_when_told(
    trusted: bool, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.TRUST_PROXY_HEADERS = trusted
    monkeypatch.setattr(gantry.asgi, "_started", True)
    seen: list[dict[str, Any]] = []

    async def router(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)

    monkeypatch.setattr(gantry.asgi, "router", router)
    for kind in ("http", "websocket"):
        await gantry.asgi.application(scope(kind, x_forwarded_proto="https", x_forwarded_for="198.51.100.7"), None, None)
    schemes = [s.get("scheme") for s in seen]
    clients = [s["client"][0] for s in seen]
    if trusted:
        assert (schemes, clients) == (["https", "wss"], ["198.51.100.7"] * 2)
    else:
        assert (schemes, clients) == (["http", None], ["127.0.0.1"] * 2)


# On the live site: `site` trusts no proxy; `trusting` trusts its proxy and one more origin.


@pytest.fixture(scope="module")
def trusting(tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    env = {"TRUST_PROXY_HEADERS": "true", "CSRF_TRUSTED_ORIGINS": TRUSTED}
    with run_site(tmp_path_factory.mktemp("trusting"), tabby.url, extra_env=env) as site:
        yield site


def https_origin(site: Site) -> str:
    return site.url.replace("http://", "https://")


def write(client: httpx.Client, origin: str, **headers: str) -> httpx.Response:
    """A page's write: its Origin, the CSRF token, and whatever a proxy (or an impostor) adds."""
    csrf = {"X-CSRFToken": client.cookies["csrftoken"], "Origin": origin}
    return client.post("/api/conversations/", json={"title": "From a page"}, headers={**csrf, **headers})


@contextmanager
def page_socket(site: Site, client: httpx.Client, origin: str, **headers: str) -> Iterator[ClientConnection]:
    extra = {"Cookie": f"session_id={client.cookies['session_id']}", "Origin": origin, **headers}
    with connect("ws" + site.url.removeprefix("http") + "/ws/chat/", additional_headers=extra, open_timeout=10) as socket:
        assert json.loads(socket.recv(timeout=10))["type"] == "model.state"
        yield socket


def refused_socket(site: Site, client: httpx.Client, origin: str, **headers: str) -> int:
    with pytest.raises(InvalidStatus) as refused, page_socket(site, client, origin, **headers):
        pass
    return refused.value.response.status_code


def test_without_trust_proxy_headers_a_forwarded_scheme_changes_nothing(site: Site) -> None:
    with site.session(MEMBER) as client:
        client.get("/")  # the page's CSRF cookie
        forged = write(client, https_origin(site), **{"X-Forwarded-Proto": "https"})
        plain = write(client, site.url, **{"X-Forwarded-Proto": "https"})
        socket_status = refused_socket(site, client, https_origin(site), **{"X-Forwarded-Proto": "https"})
        with page_socket(site, client, site.url, **{"X-Forwarded-Proto": "https"}):
            pass
    assert forged.status_code == 403
    assert forged.json() == {"detail": "Cross-site requests are refused."}
    assert plain.status_code == 201
    assert socket_status == 403


def test_with_trust_proxy_headers_the_forwarded_scheme_is_the_pages(trusting: Site) -> None:
    tls = {"X-Forwarded-Proto": "https"}
    with trusting.session(MEMBER) as client:
        client.get("/")
        written = write(client, https_origin(trusting), **tls)
        downgraded = write(client, trusting.url, **tls)  # an http page cannot write to the https site
        with page_socket(trusting, client, https_origin(trusting), **tls) as socket:
            socket.send(json.dumps({"type": "chat.send", "ref": 1, "content": "Hello"}))
            reply = json.loads(socket.recv(timeout=30))
            while reply["type"] == "chat.models":  # the greeting's second event: the model picker's list
                reply = json.loads(socket.recv(timeout=30))
        plain_socket = refused_socket(trusting, client, trusting.url, **tls)
    assert written.status_code == 201
    assert downgraded.status_code == 403
    # The sidebar's socket opened, and its session holds: it answers as the sidebar does.
    assert reply == {"type": "chat.refused", "ref": 1, "detail": "Open a conversation to send a message."}
    assert plain_socket == 403


def test_csrf_trusted_origins_may_write_and_open_sockets(trusting: Site) -> None:
    with trusting.session(MEMBER) as client:
        client.get("/")
        written = write(client, TRUSTED)
        with page_socket(trusting, client, TRUSTED):
            pass
        other = write(client, "https://other.example.com")
        other_socket = refused_socket(trusting, client, "https://other.example.com")
        other_port = refused_socket(trusting, client, TRUSTED + ":8443")
    assert written.status_code == 201
    assert other.status_code == 403
    assert (other_socket, other_port) == (403, 403)
