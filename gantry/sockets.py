"""What the pages' sockets share: who may open one, how long it stays open, and broadcast events.

A socket opens for a logged-in user whose session still holds, within the user's number of sockets
(gantry/socket_slots.py), and joins the user's `sockets-<id>` group. It closes with code 4401 (the page
reloads, landing on the login page when the session is gone) when that session ends: a logout (that
session's sockets), a password change, a deactivation or a deletion (all of the user's; see
`end_sessions`), and when a heartbeat finds the session gone in a way no signal told (it expired, or it
was ended in a process whose channel layer does not reach this one).
"""

from __future__ import annotations

import asyncio
import logging
from importlib import import_module
from typing import Any, ClassVar

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model, load_backend
from django.utils.crypto import constant_time_compare

from gantry.broadcast import SessionEndedEvent, broadcast, sockets_group
from gantry.metrics import WEBSOCKETS
from gantry.parsers import loads
from gantry.socket_slots import give_back, keep_place, take_place

log = logging.getLogger(__name__)
SESSION_ENDED = 4401  # close code: the session is over; the page reloads
NO_PLACE = 4429  # close code: the socket lost its place among the user's sockets; the page reconnects later
SESSION_GONE = "Your session has ended (you logged out, your password changed or your account was deactivated). Log in again."


def session_holds(user_id: Any, session_key: str | None) -> bool:
    """Whether the session still logs in `user_id`, as Django checks on every request: not logged out nor
    expired, the account active and there, the session's hash of the password still the password's.
    Read afresh, and read only (Django's own `get_user` would flush or cycle the session it checks)."""
    if not session_key:
        return False
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    backend_path, session_hash = session.get(BACKEND_SESSION_KEY), session.get(HASH_SESSION_KEY)
    if backend_path not in settings.AUTHENTICATION_BACKENDS or not session_hash or session.get(SESSION_KEY) is None:
        return False
    if str(get_user_model()._meta.pk.to_python(session[SESSION_KEY])) != str(user_id):
        return False
    user = load_backend(backend_path).get_user(user_id)  # None when deleted or not active
    if user is None:
        return False
    hashes = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
    return any(constant_time_compare(session_hash, known) for known in hashes)


def end_sessions(user_id: int, session_key: str | None = None) -> None:
    """Close the sockets of one session of the user (`session_key`), or of all of them (None)."""
    broadcast(sockets_group(user_id), SessionEndedEvent(type="session.ended", session_key=session_key))


# The heartbeat of this process's sockets: one task and one thread hop a beat for all of them (each session
# read once), not a timer and a database round per socket.
_beating: set[EventConsumer] = set()
_beat_task: asyncio.Task[None] | None = None


def beat_for(socket: EventConsumer) -> None:
    global _beat_task
    _beating.add(socket)
    if _beat_task is None or _beat_task.done():
        _beat_task = asyncio.get_running_loop().create_task(_beat())


def beat_no_more(socket: EventConsumer) -> None:
    _beating.discard(socket)
    if not _beating and _beat_task is not None:
        _beat_task.cancel()  # the last socket closed: no task waits out a heartbeat for nothing


async def _beat() -> None:
    while _beating:
        await asyncio.sleep(settings.GANTRY_SOCKET_HEARTBEAT)
        sockets = list(_beating)
        try:
            verdicts = await database_sync_to_async(_renew_all)([(s.user_id, s.session_key, s.place, s.channel_name) for s in sockets])
        except Exception:  # any failure: a passing outage of the database or cache ends no page; the next beat tries again
            log.warning("The sockets' heartbeat failed; trying again at the next one.", exc_info=True)
            continue
        closed = []
        for socket, (holds, place) in zip(sockets, verdicts):
            if socket not in _beating:  # it closed meanwhile: a place it took again goes back
                closed.append((place, socket.channel_name))
                continue
            socket.place = place
            if not holds or place is None:
                _beating.discard(socket)
                await socket.close(code=SESSION_ENDED if not holds else NO_PLACE)
        if closed:
            await database_sync_to_async(_give_back_all)(closed)


def _renew_all(sockets: list[tuple[Any, str | None, str | None, str]]) -> list[tuple[bool, str | None]]:
    """For each socket (user, session, place, channel): whether its session holds, and its place renewed."""
    holding: dict[tuple[Any, str | None], bool] = {}
    verdicts: list[tuple[bool, str | None]] = []
    for user_id, session_key, place, channel_name in sockets:
        holds = holding.get((user_id, session_key))
        if holds is None:
            holds = holding[(user_id, session_key)] = session_holds(user_id, session_key)
        if not holds:
            verdicts.append((False, place))
        else:
            verdicts.append((True, keep_place(place, user_id, channel_name) if place is not None else None))
    return verdicts


def _give_back_all(places: list[tuple[str | None, str]]) -> None:
    for place, channel_name in places:
        if place is not None:
            give_back(place, channel_name)


# This process's open pages, by page: someone is looking at the model's state (see models_admin.watcher).
_open_pages: dict[str, int] = {}


def pages_open() -> int:
    """How many pages (chat, Admin Dashboard) have a socket open to this process."""
    return sum(_open_pages.values())


class EventConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """A page's socket: admitted as the module says, then forwarding the broadcast events named in
    `forwarded` to its page.

    Channels closes stale database connections before every message it dispatches, a thread hop each;
    forwarding an event touches no database, and a page receives one per token of an answer, so those
    go straight out. Other messages (connect, disconnect, session.ended) take Channels' usual path.
    """

    forwarded: ClassVar[frozenset[str]] = frozenset()
    page: ClassVar[str] = ""  # the label of gantry_websocket_connections
    _counted = False
    session_key: str | None = None
    place: str | None = None
    user_id: Any = None

    async def admits(self, user: Any) -> bool:
        """Whether this user may open this socket (a subclass's own rule: admins only, own conversation)."""
        return True

    def groups_of(self, user: Any) -> list[str]:
        """The broadcast groups whose events the socket forwards."""
        return []

    async def greet(self) -> None:
        """What the page receives first, once the socket is open."""

    async def connect(self) -> None:
        user = self.scope["user"]
        if not user.is_authenticated or not await self.admits(user):
            await self.close()
            return
        self.session_key = self.scope["session"].session_key
        # Joined before the session is checked again: a logout from now on reaches this socket.
        self.groups = [sockets_group(user.pk), *self.groups_of(user)]
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        self.place = await database_sync_to_async(self._admit)(user.pk)
        if self.place is None:
            for group in self.groups:
                await self.channel_layer.group_discard(group, self.channel_name)
            await self.close()  # 403: the session ended meanwhile, or the user has too many sockets open
            return
        await self.accept()
        self.user_id = user.pk
        beat_for(self)
        await self.greet()

    def _admit(self, user_id: int) -> str | None:
        return take_place(user_id, self.channel_name) if session_holds(user_id, self.session_key) else None

    async def disconnect(self, code: int) -> None:
        # Channels has left the groups already.
        beat_no_more(self)
        if self.place is not None:
            await database_sync_to_async(give_back)(self.place, self.channel_name)
            self.place = None

    async def session_ended(self, event: SessionEndedEvent) -> None:
        if event["session_key"] is None or event["session_key"] == self.session_key:
            await self.close(code=SESSION_ENDED)

    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        await super().accept(subprotocol, headers)
        if not self._counted:
            self._counted = True
            WEBSOCKETS.labels(self.page).inc()
            _open_pages[self.page] = _open_pages.get(self.page, 0) + 1

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        if self._counted:
            self._counted = False
            WEBSOCKETS.labels(self.page).dec()
            _open_pages[self.page] -= 1
        await super().websocket_disconnect(message)

    async def dispatch(self, message: dict[str, Any]) -> None:
        if message["type"] in self.forwarded:
            await self.send_json(message)
        else:
            await super().dispatch(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        # Channels would raise on a binary frame or malformed JSON (nested too deeply included), which
        # closes the socket with an error: a page's mistake is answered, never a crash.
        try:
            content = loads(text_data if text_data is not None else bytes_data or b"")
        except ValueError:
            await self.refuse_malformed()
            return
        await self.receive_json(content, **kwargs)

    async def refuse_malformed(self) -> None:
        pass  # a socket that takes no actions ignores what it cannot read, too

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        pass  # actions go through the HTTP API unless a consumer takes some here
