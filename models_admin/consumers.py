"""The Admin Dashboard's socket: model state, switch progress and list changes, for admins only."""

from __future__ import annotations

from channels.db import database_sync_to_async

from gantry.broadcast import MODELS_GROUP
from gantry.sockets import EventConsumer
from models_admin.services import backend_event


class ModelsConsumer(EventConsumer):
    page = "models"
    groups = [MODELS_GROUP]
    forwarded = frozenset({"model.state", "model.progress", "model.list"})

    async def connect(self) -> None:
        user = self.scope["user"]
        if not (user.is_authenticated and user.is_staff):
            await self.close()
            return
        await self.accept()
        await self.send_json({"type": "model.state", **await database_sync_to_async(backend_event)()})
