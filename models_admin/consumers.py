"""The Admin Dashboard's socket: model state, switch progress and list changes, for admins only."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async

from gantry.broadcast import MODELS_GROUP
from gantry.sockets import EventConsumer
from models_admin.services import backend_event


class ModelsConsumer(EventConsumer):
    page = "models"
    forwarded = frozenset({"model.state", "model.progress", "model.list", "backend.state"})

    async def admits(self, user: Any) -> bool:
        return bool(user.is_staff)

    def groups_of(self, user: Any) -> list[str]:
        return [MODELS_GROUP]

    async def greet(self) -> None:
        await self.send_json({"type": "model.state", **await database_sync_to_async(backend_event)()})
