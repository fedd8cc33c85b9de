"""ASGI entry point: Django for HTTP, Channels for WebSockets (authenticated, same-origin only).

Behind a proxy whose headers are trusted (TRUST_PROXY_HEADERS), every connection's scheme and client
address are first taken from them (gantry/proxy.py), for HTTP and sockets alike.
"""

from __future__ import annotations

import asyncio
import gc
import os
from functools import partial
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gantry.settings")
django.setup(set_prefix=False)  # before anything that imports models

from channels.auth import AuthMiddlewareStack
from channels.routing import ProtocolTypeRouter, URLRouter
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler

import chat.routing
import models_admin.routing
from chat.queue import wake
from gantry.background import bind_serving_loop, every, in_thread, repeat
from gantry.origins import SameSiteSockets
from gantry.proxy import as_the_proxy_saw_it
from gantry.serving import ThreadedWSGI, is_async_view, raw_request_bodies, tidy_connections_in_threads_only
from models_admin.services import request_check
from models_admin.tabby_client import tls_context
from models_admin.tasks import refresh_models
from models_admin.watcher import watch_round

# Both handlers are built from the one settings.MIDDLEWARE (see gantry/serving.py).
async_view_application = ASGIHandler()
threaded_application = ThreadedWSGI(WSGIHandler())
tidy_connections_in_threads_only()
raw_request_bodies()


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Async views on the event loop; sync views (pages, the chat API) each in one pool thread."""
    if is_async_view(scope["path"]):
        await async_view_application(scope, receive, send)
    else:
        await threaded_application(scope, receive, send)


router = ProtocolTypeRouter(
    {
        "http": http,
        # Django's CSRF origin rules (scheme, host and port; CSRF_TRUSTED_ORIGINS), as for HTTP writes.
        "websocket": SameSiteSockets(
            AuthMiddlewareStack(URLRouter(chat.routing.websocket_urlpatterns + models_admin.routing.websocket_urlpatterns))
        ),
    }
)


_started = False


def start_background_work() -> None:
    """Embedded (no Celery broker), the periodic work runs in the web process; beat does it otherwise.
    Every web process watches the model's state closely while it is in doubt or messages wait."""
    in_thread(tls_context)  # made once, before the first answer needs it

    if settings.CELERY_BROKER_URL:
        in_thread(refresh_models.run)  # beat refreshes from now on; learn the state at once
    else:
        every(settings.GANTRY_REFRESH_INTERVAL, refresh_models)
    # A process that just started cannot tell a model server still loading its model from one with none.
    in_thread(request_check, settings.GANTRY_REFRESH_INTERVAL)
    # Embedded, this process loads the `preload` models at its start; Celery's watch_fleet does otherwise.
    repeat("gantry-watcher", partial(watch_round, preload=not settings.CELERY_BROKER_URL))
    wake()  # messages held before this process started


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _started
    # Background work of this process (answers, releases) runs on the loop that serves its sockets: the
    # current one, since a process may serve from a new loop later (a restarted server, an in-process test).
    bind_serving_loop(asyncio.get_running_loop())
    if not _started:
        _started = True
        start_background_work()
    if settings.TRUST_PROXY_HEADERS:
        scope = as_the_proxy_saw_it(scope)
    await router(scope, receive, send)


# What the imports built lives as long as the process. Out of the garbage collector's reach, its full
# passes (each one holds the interpreter, and with it every answer's relay, for tens of milliseconds)
# walk only what the requests create.
gc.freeze()
