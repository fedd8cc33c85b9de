"""The embedded default's channel layer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from channels import layers
from channels.exceptions import ChannelFull


class InMemoryChannelLayer(layers.InMemoryChannelLayer):  # type: ignore[misc]
    """Channels' in-memory layer, made cheap enough for a token an event to a hundred pages.

    - Expired messages are swept out at most once a second: the stock layer walks every channel and
      group on each receive and group send, and with a hundred pages open that walk costs more than the
      token it carries. Messages expire after a minute, so a second of slack changes nothing.
    - A group send puts the message in each member's queue at once, where the stock layer starts a task
      per member and waits for them all.
    - A message is copied one level deep, not deep-copied: every event is built afresh for its send
      (gantry.broadcast), and no receiver changes what it got.
    """

    CLEAN_EVERY = 1.0  # seconds
    _cleaned = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._cleaned >= self.CLEAN_EVERY:
            self._cleaned = now
            super()._clean_expired()

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        self._put(channel, message)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_group_name(group)
        self._clean_expired()
        for channel in list(self.groups.get(group, ())):
            try:
                self._put(channel, message)
            except ChannelFull:
                pass  # as the stock layer: a full channel misses the message, the others get it

    def _put(self, channel: str, message: dict[str, Any]) -> None:
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        try:
            queue.put_nowait((time.time() + self.expiry, dict(message)))
        except asyncio.QueueFull:
            raise ChannelFull(channel) from None
