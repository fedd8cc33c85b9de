"""An answer's request sent before its question's rows are saved (a new message answered at once, an
API request): the first token waits on the request, not on the database."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable

from chat.generation import Answer, stream_answer
from chat.streaming import Prompt
from gantry.background import spawn
from models_admin.models import Backend

# Seconds a posting request waits for TabbyAPI to take its answer's request before saving its rows (both
# need the interpreter; the first token waits on the request). A busy process stops waiting early.
REQUEST_HEAD_START = 0.01


class _Taken(threading.Event):
    """Set once TabbyAPI has taken an answer's request (or refused it): waited for by a thread, or on the
    event loop that sets it (`until`)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[asyncio.Future[None]] = []

    def set(self) -> None:
        super().set()
        for waiter in self._waiters:  # on the loop: `opened` sets it there
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def until(self, timeout: float) -> None:
        if self.is_set():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, timeout)


class EarlyRequest:
    """An answer whose request goes to TabbyAPI before its rows are saved (a new message that is answered
    at once): the first token waits on the request, not on the database.

    The posting thread calls `send`, saves the rows, then `saved` (or `withdraw` when nothing was saved:
    the request is closed, which ends the generation upstream). A request may go out on a guess of its
    backend made before the claim lock is taken (an API request, before its conversation is written):
    `to` keeps it when the claim picks the same backend, else withdraws it and sends it where it belongs.
    """

    def __init__(self) -> None:
        self.backend: Backend | None = None  # where the request went, while it stands
        self._saved: concurrent.futures.Future[Answer | None] | None = None
        self._closed = False
        self._taken: _Taken | None = None
        self._lock = threading.RLock()  # a send from the posting thread and a close from the loop, one at a time

    def send(self, history: Prompt, then: Callable[[], None], backend: Backend, wait: bool = True) -> None:
        """Send the request (a request sent before is withdrawn). From a thread that saves the rows next,
        `wait` a moment for TabbyAPI to take it; from the event loop, never wait. Once closed, nothing is sent."""
        taken = _Taken()
        with self._lock:
            self.withdraw()
            if self._closed:
                return
            saved: concurrent.futures.Future[Answer | None] = concurrent.futures.Future()
            self._saved, self.backend, self._taken = saved, backend, taken
            spawn(stream_answer(history, _when(saved), then, backend, taken))
        if wait:
            # Saving the rows needs the interpreter, as sending the request does: the request goes first.
            taken.wait(timeout=REQUEST_HEAD_START)

    async def taken(self) -> None:
        """On the event loop, after a `send(wait=False)` from it: until TabbyAPI has taken the request, at
        most REQUEST_HEAD_START (the rows' work, in a thread, would take the interpreter from the request)."""
        if self._taken is not None:
            await self._taken.until(REQUEST_HEAD_START)

    def to(self, backend: Backend | None, history: Callable[[Backend], Prompt], then: Callable[[], None]) -> None:
        """The claim picked `backend` (None: the message is held): the request goes there, or nowhere."""
        sent_to = self.backend
        if backend is not None and sent_to is not None and (sent_to.pk, sent_to.active_model) == (backend.pk, backend.active_model):
            return  # the guess was right: the request is on its way
        self.withdraw()
        if backend is not None:
            self.send(history(backend), then, backend)

    def saved(self, answer: Answer) -> None:
        self._settle(answer)  # unless it was withdrawn meanwhile (an API request's caller went away)

    def withdraw(self) -> None:
        self._settle(None)
        self.backend = None

    def close(self) -> None:
        """Withdraw the request for good: its caller went away (a thread may still be about to send it)."""
        with self._lock:
            self._closed = True
            self.withdraw()

    def _settle(self, answer: Answer | None) -> None:
        if self._saved is not None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # the first word stands
                self._saved.set_result(answer)


async def _when(saved: concurrent.futures.Future[Answer | None]) -> Answer | None:
    return await asyncio.wrap_future(saved)
