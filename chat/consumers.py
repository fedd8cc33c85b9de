"""The chat page's socket: live answers, message states, the sidebar and the model banner."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async

from chat.models import Conversation
from gantry.broadcast import CHAT_GROUP, conversation_group, user_group
from gantry.sockets import EventConsumer
from models_admin.services import backend_event


class ChatConsumer(EventConsumer):
    """`ws/chat/` (sidebar and banner) or `ws/chat/<conversation_id>/` (that conversation too)."""

    groups: list[str] = []
    forwarded = frozenset(
        {
            "chat.message",
            "chat.queued",
            "chat.token",
            "chat.done",
            "chat.error",
            "chat.conversation",
            "model.state",
            "model.progress",
            "model.list",
        }
    )

    async def connect(self) -> None:
        user = self.scope["user"]
        if not user.is_authenticated:
            await self.close()
            return
        self.groups = [user_group(user.pk), CHAT_GROUP]
        conversation_id = self.scope["url_route"]["kwargs"].get("conversation_id")
        if conversation_id is not None:
            if not await self._owns(user, conversation_id):
                await self.close()
                return
            self.groups.append(conversation_group(conversation_id))
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "model.state", **await database_sync_to_async(backend_event)()})

    async def disconnect(self, code: int) -> None:
        for group in self.groups:
            await self.channel_layer.group_discard(group, self.channel_name)

    @database_sync_to_async
    def _owns(self, user: Any, conversation_id: int) -> bool:
        return Conversation.objects.owned_by(user).filter(pk=conversation_id).exists()
