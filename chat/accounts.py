"""Logging in and out, guarded against guessing: every password check (the login page, the API, the
Django admin's login) goes through `GuardedModelBackend`.

Before a password is hashed, the attempt takes its place in two counters kept in the cache: the account's
(from any address) and the address's (for any account). Taking the place is one atomic increment, so
twenty guesses sent at once get exactly GANTRY_LOGIN_MAX_FAILURES checks, not as many as arrive before
the first failure is written down. A refused attempt costs no hashing. A failure stays counted until
GANTRY_LOGIN_LOCKOUT seconds pass without another; a success clears the account's count and gives the
address its place back.

Credentials no account can have (not text, too long, NUL or an unpaired surrogate) are refused before
any cache or database work, and the cache keys are hashes: a megabyte username costs its reading only.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate, get_user_model, login
from django.contrib.auth.backends import ModelBackend
from django.core.cache import caches
from django.core.exceptions import PermissionDenied
from django.db import connection
from django.http import HttpRequest

from gantry.parsers import is_storable
from gantry.rows import Rows

WRONG = "Wrong username or password."
# Longer than any username Django's user model stores, or than any password a person types.
MAX_USERNAME = 150
MAX_PASSWORD = 1024


class LoginRefused(Exception):
    """Wrong credentials or too many failures; the message is for people."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def could_be_credentials(username: object, password: object) -> bool:
    return (
        isinstance(username, str)
        and isinstance(password, str)
        and 0 < len(username) <= MAX_USERNAME
        and 0 < len(password) <= MAX_PASSWORD
        and is_storable(username)
        and is_storable(password)
    )


def _digest(kind: str, value: str) -> str:
    return f"login-failures:{kind}:{hashlib.sha256(value.encode()).hexdigest()}"


@dataclass
class Counter:
    """Failures of one account or one address: an integer in the `logins` cache, and when the last one was."""

    key: str
    limit: int
    refusal: str  # "{wait}" becomes the time left
    taken: bool = False

    def take(self) -> bool:
        """Take a place for one check; False (and no place) when the failures reached the limit."""
        cache = caches["logins"]
        lockout = settings.GANTRY_LOGIN_LOCKOUT
        for _ in range(2):
            cache.add(self.key, 0, timeout=lockout)
            try:
                count = cache.incr(self.key)
                break
            except ValueError:  # it expired between the two calls
                continue
        else:
            return True  # the cache keeps nothing: let the check run rather than lock everyone out
        if count > self.limit:
            self.give_back()
            return False
        self.taken = True
        return True

    def give_back(self) -> None:
        try:
            caches["logins"].decr(self.key)
        except ValueError:
            pass  # expired meanwhile: nothing left to give back

    def failed(self) -> None:
        """The failure stays counted until LOCKOUT seconds pass without another."""
        cache, lockout = caches["logins"], settings.GANTRY_LOGIN_LOCKOUT
        cache.touch(self.key, timeout=lockout)
        cache.set(self.key + ":at", time.time(), timeout=lockout)

    def cleared(self) -> None:
        caches["logins"].delete_many([self.key, self.key + ":at"])

    def message(self) -> str:
        at = caches["logins"].get(self.key + ":at")
        left = settings.GANTRY_LOGIN_LOCKOUT if at is None else at + settings.GANTRY_LOGIN_LOCKOUT - time.time()
        minutes = max(1, math.ceil(left / 60))
        return self.refusal.format(wait=f"{minutes} minute{'s' if minutes != 1 else ''}")


def counters(request: HttpRequest | None, username: str) -> tuple[Counter, Counter | None]:
    account = Counter(
        _digest("account", username.strip().casefold()),
        settings.GANTRY_LOGIN_MAX_FAILURES,
        "Too many wrong passwords for this account. Try again in {wait}.",
    )
    address = request.META.get("REMOTE_ADDR", "") if request is not None else ""
    if not address:
        return account, None
    return account, Counter(
        _digest("address", address),
        settings.GANTRY_LOGIN_MAX_FAILURES_PER_ADDRESS,
        "Too many wrong passwords from your network address. Try again in {wait}.",
    )


class GuardedModelBackend(ModelBackend):
    """Django's ModelBackend behind the two counters. A refusal raises PermissionDenied, which stops
    `authenticate()` before any password is hashed; the sentence is left on the request for the view."""

    def authenticate(self, request: HttpRequest | None, username: Any = None, password: Any = None, **kwargs: Any) -> Any:
        if not could_be_credentials(username, password):
            return None  # no account has such a name or password: nothing to count, nothing to hash
        account, address = counters(request, username)
        for counter in (account, address):
            if counter is not None and not counter.take():
                if account.taken:
                    account.give_back()
                refusal = LoginRefused(counter.message(), 429)
                if request is not None:
                    request.login_refusal = refusal  # type: ignore[attr-defined]
                raise PermissionDenied(refusal.message)
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            account.failed()
            if address is not None:
                address.failed()
        else:
            account.cleared()
            if address is not None:
                address.give_back()
        return user

    def get_user(self, user_id: Any) -> Any:
        # Every request asks this of its session: one plain statement, built once (gantry.rows).
        user = users_by_id().first([user_id])
        return user if user is not None and self.user_can_authenticate(user) else None


@lru_cache(maxsize=1)
def users_by_id() -> Rows[Any]:
    model = get_user_model()
    return Rows(model, f"{connection.ops.quote_name(str(model._meta.pk.column))} = %s")


def log_in(request: HttpRequest, username: object, password: object) -> Any:
    """Authenticate and start the session, or raise LoginRefused."""
    if not could_be_credentials(username, password):
        raise LoginRefused(WRONG, 400)
    user = authenticate(request, username=username, password=password)
    if user is None:
        raise getattr(request, "login_refusal", None) or LoginRefused(WRONG, 400)
    login(request, user)
    return user
