"""The one origin check: a browser's request or socket must come from a page of this site.

Scripts send no `Origin` header and need no CSRF token (they hold no cookies a page could borrow). A
browser always sends it on writes and sockets. Django's CSRF origin rules decide, for HTTP and sockets
alike: the Origin is this site's own (scheme, host and port, the scheme as the browser used it: behind a
TLS proxy that is `https` once TRUST_PROXY_HEADERS lets Gantry believe the proxy, see gantry/proxy.py), or
one of CSRF_TRUSTED_ORIGINS (`https://*.example.com` for every subdomain). A browser's HTTP write must
also carry the CSRF token. A socket needs an Origin that passes, and a Host that ALLOWED_HOSTS names. A
browser also says where a request comes from in `Sec-Fetch-Site`; `cross-site` is refused whatever the
Origin says (or when it is missing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest
from django.http.request import split_domain_port, validate_host
from django.middleware.csrf import CsrfViewMiddleware
from django.utils.http import is_same_domain

CROSS_SITE = "Cross-site requests are refused."
NO_CSRF_TOKEN = "CSRF token missing or incorrect."
# A socket's scope names its scheme as the socket's; its page's origin names the page's.
PAGE_SCHEMES = {"ws": "http", "wss": "https"}
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def is_trusted_origin(origin: str, scheme: str, host: str | None) -> bool:
    """Django's CSRF origin rule: `origin` is `scheme://host` (host with its port, as the Host header
    names it; None when ALLOWED_HOSTS refuses it), or one of CSRF_TRUSTED_ORIGINS."""
    if host and origin == f"{scheme}://{host}":
        return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in {t for t in trusted if "*" not in t}:
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    wildcards = [urlsplit(t) for t in trusted if "*" in t]
    return any(w.scheme == parsed.scheme and is_same_domain(parsed.netloc, w.netloc.lstrip("*")) for w in wildcards)


def from_another_site(fetch_site: str | None) -> bool:
    return (fetch_site or "").strip().lower() == "cross-site"


def from_this_site(request: HttpRequest) -> bool:
    """Whether an HTTP request comes from a script or from a page of this site."""
    if from_another_site(request.headers.get("Sec-Fetch-Site")):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    try:
        host: str | None = request.get_host()
    except DisallowedHost:
        host = None
    return is_trusted_origin(origin, request.scheme or "http", host)


def refusal(request: HttpRequest) -> str | None:
    """Why a write must be refused: a page of another site, or a page of this one without the CSRF token."""
    if not from_this_site(request):
        return CROSS_SITE
    if request.headers.get("Origin") is None:
        return None
    csrf = CsrfViewMiddleware(lambda r: None)  # type: ignore[arg-type, return-value]
    return NO_CSRF_TOKEN if csrf.process_view(request, lambda r: None, (), {}) is not None else None  # type: ignore[arg-type, return-value]


def allowed_host(host: str) -> str | None:
    """The Host header when ALLOWED_HOSTS names it (as Django's `request.get_host()` decides), else None."""
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    domain, _ = split_domain_port(host)
    return host if domain and validate_host(domain, allowed) else None


def socket_from_this_site(scope: dict[str, Any]) -> bool:
    """Whether a socket was opened by a page of this site (Channels' own check compares host names only,
    so a page on another port or scheme of the same host would pass it)."""
    headers = dict(scope.get("headers", []))
    if from_another_site(headers.get(b"sec-fetch-site", b"").decode("latin-1")):
        return False
    if b"origin" not in headers:
        return False
    origin, host = headers[b"origin"].decode("latin-1"), headers.get(b"host", b"").decode("latin-1")
    return is_trusted_origin(origin, PAGE_SCHEMES.get(scope.get("scheme", "ws"), "http"), allowed_host(host))


class SameSiteSockets:
    """Refuses (403, before any consumer runs) a socket that no page of this site opened."""

    def __init__(self, application: ASGIApp) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if socket_from_this_site(scope):
            await self.application(scope, receive, send)
        else:
            await WebsocketDenier()(scope, receive, send)
