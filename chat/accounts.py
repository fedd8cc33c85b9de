"""Logging in and out, with a lockout after repeated wrong passwords."""

from __future__ import annotations

import math
import time
from typing import Any

from django.conf import settings
from django.contrib.auth import authenticate, login
from django.core.cache import cache
from django.http import HttpRequest


class LoginRefused(Exception):
    """Wrong credentials or too many failures; the message is for people."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _key(request: HttpRequest, username: str) -> str:
    return f"login-failures:{request.META.get('REMOTE_ADDR', '')}:{username.strip().lower()}"


def log_in(request: HttpRequest, username: str, password: str) -> Any:
    """Authenticate and start the session, or raise LoginRefused."""
    key = _key(request, username)
    failures, since = cache.get(key, (0, 0.0))
    wait = since + settings.GANTRY_LOGIN_LOCKOUT - time.time()
    if failures >= settings.GANTRY_LOGIN_MAX_FAILURES and wait > 0:
        minutes = math.ceil(wait / 60)
        raise LoginRefused(
            f"Too many wrong passwords for this account. Try again in {minutes} minute{'s' if minutes != 1 else ''}.", 429
        )
    user = authenticate(request, username=username, password=password)
    if user is None:
        failures = 1 if wait <= 0 and failures >= settings.GANTRY_LOGIN_MAX_FAILURES else failures + 1
        cache.set(key, (failures, time.time()), timeout=settings.GANTRY_LOGIN_LOCKOUT)
        raise LoginRefused("Wrong username or password.", 400)
    cache.delete(key)
    login(request, user)
    return user
