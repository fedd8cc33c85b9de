"""The middleware of the async views (the admin API): on the event loop, without a thread hop a hook.

Django runs each hook of a classic middleware under ASGI through sync_to_async: a dozen hand-offs
between the loop and a thread per request, each waiting for the GIL while other requests run. The
async views need the session's user and the security headers; those hooks read headers and cookies and
set lazy attributes, so they run here directly. Only saving a changed session goes to a thread.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpRequest, HttpResponse
from django.middleware.security import SecurityMiddleware


class AsyncViewMiddleware:
    sync_capable = False
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        self.security = SecurityMiddleware(get_response)
        self.sessions = SessionMiddleware(get_response)
        self.auth = AuthenticationMiddleware(get_response)
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        redirect = self.security.process_request(request)  # the HTTPS redirect, when configured
        if redirect is not None:
            response: HttpResponse = redirect
        else:
            self.sessions.process_request(request)  # a lazy session store: read on first use
            self.auth.process_request(request)  # a lazy user, and request.auser()
            response = await self.get_response(request)
        session = getattr(request, "session", None)
        if session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST):
            response = await sync_to_async(self.sessions.process_response)(request, response)
        else:
            response = self.sessions.process_response(request, response)  # cookie and Vary headers only
        return self.security.process_response(request, response)
