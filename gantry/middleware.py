"""The site's one middleware stack, for sync views (pages, the chat API) and async views (the admin API).

Django's own middleware, unchanged for sync views. For async views Django would run each hook through
sync_to_async: a dozen hand-offs between the event loop and a thread per request, each waiting for the
GIL while other requests run. The hooks below only read headers and cookies and set lazy attributes, so
on the loop they run directly (`OnTheLoop`); only saving a changed session goes to a thread. A
middleware added to `settings.MIDDLEWARE` serves both kinds of view (an async view then pays Django's
hand-offs for its hooks).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.http import HttpRequest, HttpResponse
from django.middleware import clickjacking, common, csrf, security
from whitenoise.middleware import WhiteNoiseMiddleware

from gantry.probes import early_response


class OnTheLoop:
    """For a MiddlewareMixin whose hooks never block: in async mode, call them without a thread hop
    (`process_view` too, which Django would otherwise run in a thread of its own for each request)."""

    get_response: Any

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)  # type: ignore[call-arg]
        process_view = getattr(self, "process_view", None)
        if process_view is not None and iscoroutinefunction(get_response):

            async def on_the_loop(*args: Any) -> Any:
                return process_view(*args)

            setattr(self, "process_view", on_the_loop)  # Django adapts the method it finds here

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response  # type: ignore[no-any-return]


class ProbesMiddleware:
    """First in the stack: health probes, and Prometheus with its token, are answered before the host
    check and the HTTPS redirect (they address a process by container name or IP, over plain HTTP
    inside the network; see gantry.probes). Those are sync views: async views pass straight through."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.get_response(request)  # the coroutine, awaited by the caller
        response = early_response(request)
        return self.get_response(request) if response is None else response


class SecurityMiddleware(OnTheLoop, security.SecurityMiddleware):
    pass


class CommonMiddleware(OnTheLoop, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(OnTheLoop, csrf.CsrfViewMiddleware):
    pass


class AuthenticationMiddleware(OnTheLoop, auth.AuthenticationMiddleware):
    pass  # a lazy user (and request.auser()): the session is read on first use


class MessageMiddleware(OnTheLoop, messages.MessageMiddleware):
    pass  # unused messages are neither read nor stored


class XFrameOptionsMiddleware(OnTheLoop, clickjacking.XFrameOptionsMiddleware):
    pass


class SessionMiddleware(sessions.SessionMiddleware):
    """The session store is lazy (read on first use); saving a changed one is the only hook that blocks."""

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        self.process_request(request)
        response: HttpResponse = await self.get_response(request)  # type: ignore[misc]
        session = request.session
        if session.modified or settings.SESSION_SAVE_EVERY_REQUEST:
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)  # cookie and Vary headers only


class StaticFilesMiddleware(WhiteNoiseMiddleware):  # type: ignore[misc]
    """WhiteNoise's static files, in a stack that also serves async views (their paths are never static)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any) -> None:
        super().__init__(get_response)
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        static_file = self.find_file(request.path_info) if self.autorefresh else self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve)(static_file, request)  # type: ignore[no-any-return]
        return await self.get_response(request)  # type: ignore[no-any-return]
