"""Where background work runs, the same way in every process.

- `spawn(coroutine)`: run a coroutine on the process's serving event loop (daphne's, recorded by
  `gantry.asgi` on the first connection), or, in a process that serves nothing (a Celery worker, a
  management command), on one private loop thread. Streams and channel-layer sends then live on the
  loop that owns their connections.
- `dispatch(task, *args)`: a Celery task through the broker in production; embedded (no broker), the
  same function on a worker thread of this process: never in the thread of the request that asked.
- `every(seconds, task)` (the embedded stand-in for beat) and `repeat(name, func)`: periodic work on a
  daemon thread of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from django.conf import settings
from django.db import close_old_connections, transaction

log = logging.getLogger(__name__)
_serving_loop: asyncio.AbstractEventLoop | None = None
_private_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()
_threads = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="gantry-task")


def bind_serving_loop(loop: asyncio.AbstractEventLoop) -> None:
    global _serving_loop
    _serving_loop = loop


def serving_loop() -> asyncio.AbstractEventLoop | None:
    """The loop serving this process's sockets, when there is one and it runs."""
    loop = _serving_loop
    return loop if loop is not None and loop.is_running() else None


def _loop() -> asyncio.AbstractEventLoop:
    global _private_loop
    if _serving_loop is not None and not _serving_loop.is_closed():
        return _serving_loop
    with _lock:
        if _private_loop is None:
            _private_loop = asyncio.new_event_loop()
            threading.Thread(target=_private_loop.run_forever, name="gantry-loop", daemon=True).start()
        return _private_loop


def spawn(coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
    # A fresh context: the caller's (a request's) would tie the work's sync_to_async calls to that
    # request's executor, which is gone once the request ends.
    future = contextvars.Context().run(asyncio.run_coroutine_threadsafe, coroutine, _loop())
    future.add_done_callback(_log_failure)
    return future


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("Background work failed", exc_info=future.exception())


def _run_in_thread(func: Any, args: tuple[Any, ...]) -> None:
    close_old_connections()
    try:
        func(*args)
    except Exception:
        log.exception("Background task %s failed", getattr(func, "__name__", func))
    finally:
        close_old_connections()


def in_thread(func: Any, *args: Any) -> None:
    """Run `func(*args)` on a worker thread of this process now (short work that must not wait for a broker)."""
    _threads.submit(_run_in_thread, func, args)


def dispatch(task: Any, *args: Any) -> None:
    """Enqueue `task(*args)` once the current transaction commits."""
    if settings.CELERY_BROKER_URL:
        task.delay_on_commit(*args)
    else:
        transaction.on_commit(lambda: _threads.submit(_run_in_thread, task.run, args))


def repeat(name: str, func: Callable[[], float]) -> None:
    """Run `func` again and again on a daemon thread of its own, waiting as long as it returns between runs."""

    def loop() -> None:
        while True:
            close_old_connections()
            try:
                wait = func()
            except Exception:
                log.exception("%s failed", name)
                wait = 1.0
            finally:
                close_old_connections()
            time.sleep(wait)

    threading.Thread(target=loop, name=name, daemon=True).start()


def every(seconds: float, task: Any) -> None:
    """Run `task` now and then every `seconds` on a daemon thread (the embedded stand-in for beat)."""

    def loop() -> None:
        while True:
            _run_in_thread(task.run, ())
            time.sleep(seconds)

    threading.Thread(target=loop, name=f"every-{task.name}", daemon=True).start()
