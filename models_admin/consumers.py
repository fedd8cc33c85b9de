"""The Admin Dashboard's socket: model state, switch progress and list changes, for admins only."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from gantry.broadcast import MODELS_GROUP
from models_admin.services import backend_event


class ModelsConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    groups = [MODELS_GROUP]

    async def connect(self) -> None:
        user = self.scope["user"]
        if not (user.is_authenticated and user.is_staff):
            await self.close()
            return
        await self.accept()
        await self.send_json({"type": "model.state", **await database_sync_to_async(backend_event)()})

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        pass  # actions go through the admin API

    async def forward(self, event: dict[str, Any]) -> None:
        await self.send_json(event)

    model_state = model_progress = model_list = forward
