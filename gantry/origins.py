"""The one origin check: a browser's request or socket must come from a page of this site.

Scripts send no `Origin` header and need no CSRF token (they hold no cookies a page could borrow). A
browser always sends it on writes and sockets: it must be this site's own origin (scheme, host and
port), and a browser's HTTP write must also carry the CSRF token. A browser also says where a request
comes from in `Sec-Fetch-Site`; `cross-site` is refused whatever the Origin says (or when it is missing).
HTTP views and sockets both ask here.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.middleware.csrf import CsrfViewMiddleware

CROSS_SITE = "Cross-site requests are refused."
NO_CSRF_TOKEN = "CSRF token missing or incorrect."
# A socket's scope names its scheme as the socket's; its page's origin names the page's.
PAGE_SCHEMES = {"ws": "http", "wss": "https"}


def is_same_origin(origin: str, scheme: str, host: str) -> bool:
    return bool(host) and origin == f"{scheme}://{host}"


def from_another_site(fetch_site: str | None) -> bool:
    return (fetch_site or "").strip().lower() == "cross-site"


def from_this_site(request: HttpRequest) -> bool:
    """Whether an HTTP request comes from a script or from a page of this site."""
    if from_another_site(request.headers.get("Sec-Fetch-Site")):
        return False
    origin = request.headers.get("Origin")
    return origin is None or is_same_origin(origin, request.scheme or "http", request.get_host())


def refusal(request: HttpRequest) -> str | None:
    """Why a write must be refused: a page of another site, or a page of this one without the CSRF token."""
    if not from_this_site(request):
        return CROSS_SITE
    if request.headers.get("Origin") is None:
        return None
    csrf = CsrfViewMiddleware(lambda r: None)  # type: ignore[arg-type, return-value]
    return NO_CSRF_TOKEN if csrf.process_view(request, lambda r: None, (), {}) is not None else None  # type: ignore[arg-type, return-value]


def socket_from_this_site(scope: dict[str, Any]) -> bool:
    """Whether a socket was opened by a page of this site: its Origin is this site's (Channels' check at
    connect compares host names only, not ports or schemes)."""
    headers = dict(scope.get("headers", []))
    if from_another_site(headers.get(b"sec-fetch-site", b"").decode("latin-1")):
        return False
    origin, host = headers.get(b"origin", b"").decode("latin-1"), headers.get(b"host", b"").decode("latin-1")
    return is_same_origin(origin, PAGE_SCHEMES.get(scope.get("scheme", "ws"), "http"), host)
