"""How HTTP requests are served: sync views in a thread each, async views on the event loop.

Under Django's ASGI handler a sync view pays a hop between the event loop and a thread for every
middleware hook: a dozen hand-offs a request, each waiting for the GIL while other requests run. Here a
sync view's request body is read on the loop, then the whole WSGI application (middleware chain, view,
response) runs in one thread of a bounded pool, and the answer is sent from the loop. Async views (the
admin API, whose switch call waits for the switch) go to Django's ASGI handler; both handlers are built
from the one `settings.MIDDLEWARE`, whose hooks run on the loop for async views (gantry/middleware.py),
so a waiting call holds no thread. An async view's request starts on the loop: the database connections
Django tidies as a request starts are those of a thread, and an async view's database work runs in a web
thread that tidies its own around each call (`in_web_thread`), so only the threaded requests tidy them
at their start (`tidy_connections_in_threads_only`).

Views that check passwords (the logins, marked with `checks_passwords`) run in threads of their own,
GANTRY_LOGIN_THREADS: hashing a password takes most of a second of a core, and logins (a crowd of
guesses included) must never be queued ahead of pages. Hashing leaves the interpreter free, so a page
is served meanwhile on the other core.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections.abc import Callable
from functools import lru_cache, wraps
from tempfile import SpooledTemporaryFile
from typing import IO, Any, TypeVar

from asgiref.sync import iscoroutinefunction
from asgiref.wsgi import WsgiToAsgiInstance
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_started
from django.db import close_old_connections, reset_queries
from django.urls import Resolver404, resolve

BODY_IN_MEMORY = 65536  # bytes of a request body kept in memory before it spills to a temporary file
T = TypeVar("T")


@lru_cache(maxsize=1024)
def is_async_view(path: str) -> bool:
    """Whether the URL's view is a coroutine function (unknown paths, static files: no)."""
    try:
        return iscoroutinefunction(resolve(path).func)
    except Resolver404:
        return False


def checks_passwords(view: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a view that checks passwords: its requests run in the login threads, not the web threads."""

    @wraps(view)
    def marked(*args: Any, **kwargs: Any) -> Any:
        return view(*args, **kwargs)

    marked.checks_passwords = True  # type: ignore[attr-defined]
    return marked


@lru_cache(maxsize=1024)
def is_password_view(path: str) -> bool:
    try:
        return bool(getattr(resolve(path).func, "checks_passwords", False))
    except Resolver404:
        return False


_web_threads: concurrent.futures.ThreadPoolExecutor | None = None
_login_threads: concurrent.futures.ThreadPoolExecutor | None = None


def web_threads() -> concurrent.futures.ThreadPoolExecutor:
    """The process's threads for sync request work, first come first served.

    Few threads: the work holds the GIL, so more threads add no throughput, only a longer tail (all
    requests in progress share the interpreter and finish late together); GANTRY_WEB_THREADS.
    """
    global _web_threads
    if _web_threads is None:
        _web_threads = concurrent.futures.ThreadPoolExecutor(settings.GANTRY_WEB_THREADS, thread_name_prefix="gantry-web")
    return _web_threads


def login_threads() -> concurrent.futures.ThreadPoolExecutor:
    """The process's threads for views that check passwords (GANTRY_LOGIN_THREADS)."""
    global _login_threads
    if _login_threads is None:
        _login_threads = concurrent.futures.ThreadPoolExecutor(settings.GANTRY_LOGIN_THREADS, thread_name_prefix="gantry-login")
    return _login_threads


async def in_web_thread(func: Callable[..., T], *args: Any) -> T:
    """Run an async view's sync part (database work) in a web thread, in turn with the sync views."""
    return await asyncio.wrap_future(web_work(func, *args))


def web_work(func: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """The same, as a future that any thread or event loop can wait for (`asyncio.wrap_future`)."""
    return web_threads().submit(_with_connections, func, args)


def _with_connections(func: Callable[..., T], args: tuple[Any, ...]) -> T:
    close_old_connections()  # as a request does at its start and end: drop broken or expired connections
    try:
        return func(*args)
    finally:
        close_old_connections()


def raw_request_bodies() -> None:
    """Under daphne, Twisted hands each request's body over as it came, unparsed. Twisted's default
    parses the body of every form POST into arguments daphne never reads, and the Content-Type of every
    POST through the email package (a fifth of a millisecond on the way of each API call); a malformed
    form upload was even refused with Twisted's own bare 400, before Gantry could answer it. Django
    reads what it needs. Only where daphne serves (its request class is loaded before the application)."""
    module = sys.modules.get("daphne.http_protocol")
    request = getattr(module, "WebRequest", None)
    if request is None or getattr(request, "raw_bodies", False):
        return
    init = request.__init__

    @wraps(init)
    def unparsed(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        init(self, *args, **kwargs)

    request.__init__ = unparsed
    request.raw_bodies = True


def tidy_connections_in_threads_only() -> None:
    """Django tidies the thread's connections as any request starts: for an async view, that is a hop to
    a thread of its own that holds none (ASGIHandler sends the signal to sync receivers in a thread),
    before the view can start. The threaded requests (WSGIHandler) still tidy theirs as they start."""
    for receiver in (reset_queries, close_old_connections):
        request_started.disconnect(receiver)
        request_started.connect(receiver, sender=WSGIHandler)


class ThreadedWSGI:
    """An ASGI application running a WSGI application in the web threads (the login threads for views
    that check passwords), one thread a request."""

    def __init__(self, wsgi_application: Any) -> None:
        self.wsgi_application = wsgi_application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        with SpooledTemporaryFile(max_size=BODY_IN_MEMORY) as body:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client went away before it finished sending
                body.write(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body.seek(0)
            loop = asyncio.get_running_loop()
            threads = login_threads() if is_password_view(scope["path"]) else web_threads()
            start, content = await loop.run_in_executor(threads, self._respond, scope, body)
        await send(start)
        await send({"type": "http.response.body", "body": content})

    def _respond(self, scope: dict[str, Any], body: IO[bytes]) -> tuple[dict[str, Any], bytes]:
        # asgiref's adapter builds the WSGI environ and reads start_response; its sending is not used.
        instance = WsgiToAsgiInstance(self.wsgi_application)
        instance.scope = scope
        result = self.wsgi_application(instance.build_environ(scope, body), instance.start_response)
        try:
            content = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()  # Django's request_finished: the thread's database connections are closed here
        return instance.response_start, content
