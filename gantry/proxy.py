"""Behind a reverse proxy: the scheme and the client's address as the proxy saw them.

Only when TRUST_PROXY_HEADERS is true (anyone can send these headers to a site that no proxy fronts):
`X-Forwarded-Proto` gives the scheme (a socket's too: `https` → `wss`), and the last address of
`X-Forwarded-For` the client's, the one the proxy in front added (addresses before it are the client's
own claims). HTTP requests and sockets get both from the ASGI scope, through Django's handler, the
threaded WSGI adapter (gantry/serving.py) and Channels alike, so it is done once, here.

Daphne's own `--proxy-headers` is not used: it would trust the headers whatever TRUST_PROXY_HEADERS says,
takes the first (client-chosen) address, and gives sockets no scheme.
"""

from __future__ import annotations

from typing import Any

SCHEMES = {"http": {"http": "http", "https": "https"}, "websocket": {"http": "ws", "https": "wss"}}


def header(scope: dict[str, Any], name: bytes) -> str | None:
    values = [value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name]
    return ",".join(values) if values else None


def as_the_proxy_saw_it(scope: dict[str, Any]) -> dict[str, Any]:
    """The scope with the scheme and client the proxy's headers name (each left as it was without its header)."""
    if scope["type"] not in SCHEMES:
        return scope
    scope = dict(scope)
    proto = header(scope, b"x-forwarded-proto")
    if proto is not None:
        # The first value, as Django's SECURE_PROXY_SSL_HEADER reads it.
        scheme = SCHEMES[scope["type"]].get(proto.split(",")[0].strip().lower())
        if scheme is not None:
            scope["scheme"] = scheme
    forwarded_for = header(scope, b"x-forwarded-for")
    if forwarded_for is not None:
        address = forwarded_for.split(",")[-1].strip()
        if address:
            scope["client"] = (address, 0)
    return scope
