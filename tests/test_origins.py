"""The one origin check follows Django's CSRF origin rules, for HTTP requests and sockets alike: this
site's own origin (scheme, host and port), or one of CSRF_TRUSTED_ORIGINS."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import RequestFactory
from pytest_django.fixtures import Settings

from gantry.origins import from_this_site, socket_from_this_site


def socket(origin: str | None, host: str = "gantry.example.com", scheme: str | None = "ws") -> dict[str, Any]:
    """A socket's scope as daphne makes it (daphne gives sockets no scheme; gantry/proxy.py may add one)."""
    headers = [(b"host", host.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    scope: dict[str, Any] = {"type": "websocket", "path": "/ws/chat/", "headers": headers}
    if scheme is not None:
        scope["scheme"] = scheme
    return scope


def request(origin: str | None, host: str = "gantry.example.com", secure: bool = False) -> Any:
    extra = {"HTTP_ORIGIN": origin} if origin is not None else {}
    return RequestFactory().post("/api/conversations/", HTTP_HOST=host, secure=secure, **extra)


@pytest.fixture(autouse=True)
def site_settings(settings: Settings) -> Settings:
    settings.ALLOWED_HOSTS = ["gantry.example.com", "localhost"]
    settings.CSRF_TRUSTED_ORIGINS = []
    return settings


def test_a_socket_must_come_from_the_sites_own_scheme_host_and_port() -> None:
    assert socket_from_this_site(socket("http://gantry.example.com"))
    assert socket_from_this_site(socket("http://gantry.example.com:8000", host="gantry.example.com:8000"))
    assert socket_from_this_site(socket("http://gantry.example.com", scheme=None))  # daphne's own scope
    assert socket_from_this_site(socket("https://gantry.example.com", scheme="wss"))
    refused = [
        socket("http://gantry.example.com:8001", host="gantry.example.com:8000"),  # another port
        socket("http://gantry.example.com:8000"),  # a port where the site has none
        socket("https://gantry.example.com"),  # another scheme: an https page, a plain socket
        socket("http://gantry.example.com", scheme="wss"),  # a plain page, a TLS socket
        socket("http://evil.example"),
        socket("http://sub.gantry.example.com"),
        socket(None),  # no Origin at all
        socket("null"),
    ]
    assert [s for s in refused if socket_from_this_site(s)] == []


def test_a_socket_to_a_host_that_allowed_hosts_does_not_name_is_refused() -> None:
    # The attacker's own page on evil.example, its socket's Host made to match its Origin.
    assert not socket_from_this_site(socket("http://evil.example", host="evil.example"))


def test_an_http_write_must_come_from_the_sites_own_scheme_host_and_port() -> None:
    assert from_this_site(request(None))  # a script
    assert from_this_site(request("http://gantry.example.com"))
    assert from_this_site(request("https://gantry.example.com", secure=True))
    assert not from_this_site(request("https://gantry.example.com"))
    assert not from_this_site(request("http://gantry.example.com", secure=True))
    assert not from_this_site(request("http://gantry.example.com:8001", host="gantry.example.com:8000"))
    assert not from_this_site(request("http://evil.example", host="evil.example"))


def test_csrf_trusted_origins_count_as_this_site_for_requests_and_sockets(site_settings: Settings) -> None:
    site_settings.CSRF_TRUSTED_ORIGINS = ["https://gantry.example.com", "https://*.teams.example.org"]
    # Behind a TLS proxy that Gantry does not trust: the site sees http and ws, the browser says https.
    assert from_this_site(request("https://gantry.example.com"))
    assert socket_from_this_site(socket("https://gantry.example.com"))
    # Wildcards: every subdomain, on the same scheme, as Django's CSRF check has it.
    assert from_this_site(request("https://chat.teams.example.org"))
    assert socket_from_this_site(socket("https://chat.teams.example.org"))
    assert not from_this_site(request("http://chat.teams.example.org"))
    assert not socket_from_this_site(socket("http://chat.teams.example.org"))
    # A trusted origin is that one origin, not its host on another port or scheme.
    assert not from_this_site(request("https://gantry.example.com:8443"))
    assert not socket_from_this_site(socket("https://gantry.example.com:8443"))
    assert not socket_from_this_site(socket("https://teams.example.org.evil.example"))
