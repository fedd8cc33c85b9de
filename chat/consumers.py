"""The chat page's socket: live answers, message states, the sidebar and the model banner."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from django.core.exceptions import ValidationError

from chat import services
from chat.models import Conversation
from gantry.broadcast import CHAT_GROUP, RefusedEvent, SentEvent, conversation_group, user_group
from gantry.origins import CROSS_SITE, socket_from_this_site
from gantry.serving import in_web_thread
from gantry.sockets import EventConsumer
from models_admin.services import backend_event

MALFORMED = 'Send JSON objects like {"type": "chat.send", "content": "Hello", "ref": 1}.'


class ChatConsumer(EventConsumer):
    """`ws/chat/` (sidebar and banner) or `ws/chat/<conversation_id>/` (that conversation too, and the
    page's messages to it: `{"type": "chat.send", "content": ..., "ref": ...}`, answered `chat.sent` or
    `chat.refused` with the same `ref`)."""

    groups: list[str] = []
    conversation_id: int | None = None
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
            self.conversation_id = conversation_id
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "model.state", **await database_sync_to_async(backend_event)()})

    async def disconnect(self, code: int) -> None:
        for group in self.groups:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Sent here rather than POSTed, a message's answer starts sooner: no HTTP request to parse, no
        # middleware, no session to look up, no conversation to find first (its owner was checked at connect).
        # In a web thread, as a POST would be (database_sync_to_async's one shared thread would queue every
        # socket's connect behind a post waiting for its request's head start).
        if isinstance(content, dict) and content.get("type") == "chat.send":
            await self.send_json(await in_web_thread(self._post, content.get("content"), content.get("ref")))

    async def refuse_malformed(self) -> None:
        await self.send_json(RefusedEvent(type="chat.refused", ref=None, detail=MALFORMED))

    def _post(self, text: Any, ref: Any) -> SentEvent | RefusedEvent:
        if self.conversation_id is None:
            return RefusedEvent(type="chat.refused", ref=ref, detail="Open a conversation to send a message.")
        if not socket_from_this_site(self.scope):
            return RefusedEvent(type="chat.refused", ref=ref, detail=CROSS_SITE)
        try:
            message = services.post_message(self.conversation_id, text)
        except ValidationError as exc:
            return RefusedEvent(type="chat.refused", ref=ref, detail=" ".join(exc.messages))
        return SentEvent(type="chat.sent", ref=ref, message=message.as_event())

    @database_sync_to_async
    def _owns(self, user: Any, conversation_id: int) -> bool:
        return Conversation.objects.owned_by(user).filter(pk=conversation_id).exists()
