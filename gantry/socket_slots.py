"""How many sockets a user has open, across every web process: at most GANTRY_MAX_SOCKETS_PER_USER.

Each open socket holds one of the user's numbered places in the cache (Redis in production, shared by
every process; the one web process's memory embedded). Taking a place is the cache's atomic `add`, so
two processes never take the same one. A place expires unless its socket renews it every heartbeat
(GANTRY_SOCKET_HEARTBEAT): a process that dies without closing its sockets gives their places back
within three heartbeats, not never.
"""

from __future__ import annotations

import math

from django.conf import settings
from django.core.cache import cache


def lease() -> int:
    """Seconds a place is held without a renewal: three heartbeats, so one late beat loses nothing."""
    return max(1, math.ceil(3 * settings.GANTRY_SOCKET_HEARTBEAT))


def places(user_id: int) -> list[str]:
    return [f"gantry:sockets:{user_id}:{n}" for n in range(settings.GANTRY_MAX_SOCKETS_PER_USER)]


def take_place(user_id: int, channel_name: str) -> str | None:
    """A free place for the socket `channel_name`, held in its name; None when every place is held."""
    keys = places(user_id)
    held = cache.get_many(keys)  # one round trip to skip the places surely held
    for key in keys:
        if key not in held and cache.add(key, channel_name, timeout=lease()):
            return key
    return None


def keep_place(key: str, user_id: int, channel_name: str) -> str | None:
    """Renew the socket's place; one it lost (it expired, then another socket took it) is taken anew."""
    if cache.get(key) == channel_name and cache.touch(key, lease()):
        return key
    return take_place(user_id, channel_name)


def give_back(key: str, channel_name: str) -> None:
    if cache.get(key) == channel_name:
        cache.delete(key)
