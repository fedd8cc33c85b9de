"""What the pages' sockets share: broadcast events go to the page as they are."""

from __future__ import annotations

from typing import Any, ClassVar

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from gantry.metrics import WEBSOCKETS


class EventConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """A socket that forwards the broadcast events named in `forwarded` to its page.

    Channels closes stale database connections before every message it dispatches, a thread hop each;
    forwarding an event touches no database, and a page receives one per token of an answer, so those
    go straight out. Other messages (connect, disconnect) take Channels' usual path.
    """

    forwarded: ClassVar[frozenset[str]] = frozenset()
    page: ClassVar[str] = ""  # the label of gantry_websocket_connections
    _counted = False

    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        await super().accept(subprotocol, headers)
        if not self._counted:
            self._counted = True
            WEBSOCKETS.labels(self.page).inc()

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        if self._counted:
            self._counted = False
            WEBSOCKETS.labels(self.page).dec()
        await super().websocket_disconnect(message)

    async def dispatch(self, message: dict[str, Any]) -> None:
        if message["type"] in self.forwarded:
            await self.send_json(message)
        else:
            await super().dispatch(message)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        pass  # actions go through the HTTP API unless a consumer takes some here
