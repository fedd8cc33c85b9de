"""API keys, with TabbyAPI's rules about which header carries which key.

API endpoints read `x-api-key` or `Authorization: Bearer`; admin endpoints read `x-admin-key` or
`Authorization: Bearer`. The admin key is valid wherever an API key is.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from fastapi import HTTPException, Request

Permission = Literal["admin", "api"]


def same_key(given: str, key: str) -> bool:
    """A constant-time comparison of any header value with a key. Compared as bytes: compare_digest
    refuses str with non-ASCII characters (a TypeError, which would answer a plain-text 500)."""
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass"))


@dataclass
class AuthKeys:
    api_keys: list[str]
    admin_key: str

    def is_admin(self, key: str) -> bool:
        return same_key(key, self.admin_key)

    def is_api(self, key: str) -> bool:
        return self.is_admin(key) or any(same_key(key, k) for k in self.api_keys)


def write_private(path: Path, text: str) -> bool:
    """Write a new file readable by its owner only from the first byte (mode 0600 at creation, not a
    chmod after: the keys are never readable by others, not even for a moment). False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
    return True


def load_or_create_keys(path: Path) -> AuthKeys:
    """Read `api_tokens.yml`; write one with random keys when it is missing."""
    if not path.exists():
        keys = AuthKeys(api_keys=[secrets.token_hex(16)], admin_key=secrets.token_hex(16))
        if write_private(path, yaml.safe_dump({"api_key": keys.api_keys[0], "admin_key": keys.admin_key})):
            return keys
        # Another process wrote the file first: its keys are the server's.
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    api = data.get("api_key")
    api_keys = [str(k) for k in api] if isinstance(api, list) else [str(api)] if api else []
    admin = data.get("admin_key")
    if not api_keys or not admin:
        raise ValueError(f"{path} must set api_key (one key or a list) and admin_key.")
    return AuthKeys(api_keys=api_keys, admin_key=str(admin))


def _bearer(header: str) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, None when it is not one."""
    parts = header.split(" ")
    return parts[1] if len(parts) >= 2 and parts[0].lower() == "bearer" else None


class Authenticator:
    def __init__(self, keys: AuthKeys | None) -> None:
        self.keys = keys  # None: authentication is disabled and every caller is admin

    def _check(self, request: Request, header: str, kind: str, valid: Callable[[str], bool]) -> None:
        if self.keys is None:
            return
        key = request.headers.get(header)
        if not key:
            authorization = request.headers.get("authorization")
            if not authorization:
                raise HTTPException(401, f"Please provide an {kind} key")
            key = _bearer(authorization)
        if not key or not valid(key):
            raise HTTPException(401, f"Invalid {kind} key")

    def require_api(self, request: Request) -> None:
        self._check(request, "x-api-key", "API", lambda key: self.keys is not None and self.keys.is_api(key))

    def require_admin(self, request: Request) -> None:
        self._check(request, "x-admin-key", "admin", lambda key: self.keys is not None and self.keys.is_admin(key))

    def permission(self, request: Request) -> Permission:
        """The caller's permission, looked up as TabbyAPI does (Authorization, then x-admin-key, then x-api-key).

        TabbyAPI lets an invalid key here escape as a plain-text 500; this server answers 400 JSON instead.
        """
        if self.keys is None:
            return "admin"
        key = request.headers.get("authorization") or request.headers.get("x-admin-key") or request.headers.get("x-api-key")
        if key is None:
            raise HTTPException(401, "Please provide an API key")
        if key.lower().startswith("bearer"):
            key = _bearer(key) or ""
        if self.keys.is_admin(key):
            return "admin"
        if self.keys.is_api(key):
            return "api"
        raise HTTPException(400, "The provided authentication key is invalid.")
