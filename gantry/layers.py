"""The embedded default's channel layer."""

from __future__ import annotations

import time

from channels import layers


class InMemoryChannelLayer(layers.InMemoryChannelLayer):  # type: ignore[misc]
    """Channels' in-memory layer, sweeping out expired messages at most once a second.

    The stock layer walks every channel and group on each receive and group send; with a hundred pages
    open, that walk costs more than the token it carries. Messages expire after a minute, so a second
    of slack changes nothing.
    """

    CLEAN_EVERY = 1.0  # seconds
    _cleaned = 0.0

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._cleaned >= self.CLEAN_EVERY:
            self._cleaned = now
            super()._clean_expired()
