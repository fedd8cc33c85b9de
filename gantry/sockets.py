"""What the pages' sockets share: broadcast events go to the page as they are."""

from __future__ import annotations

from typing import Any, ClassVar

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from gantry.parsers import loads


class EventConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """A socket that forwards the broadcast events named in `forwarded` to its page.

    Channels closes stale database connections before every message it dispatches, a thread hop each;
    forwarding an event touches no database, and a page receives one per token of an answer, so those
    go straight out. Other messages (connect, disconnect) take Channels' usual path.
    """

    forwarded: ClassVar[frozenset[str]] = frozenset()

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
