"""The chat page's socket: live answers, message states, the sidebar and the model banner."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from django.core.exceptions import ValidationError

from chat import services
from chat.models import Conversation
from gantry.broadcast import CHAT_GROUP, RefusedEvent, SentEvent, conversation_group, user_group
from gantry.serving import in_web_thread
from gantry.sockets import SESSION_ENDED, SESSION_GONE, EventConsumer, session_holds
from models_admin.services import chat_state, served_models
from models_admin.swap_scheduler import loadable_models

MALFORMED = 'Send JSON objects like {"type": "chat.send", "content": "Hello", "ref": 1}.'


class ChatConsumer(EventConsumer):
    """`ws/chat/` (sidebar and banner) or `ws/chat/<conversation_id>/` (that conversation too, and the
    page's messages to it: `{"type": "chat.send", "content": ..., "ref": ...}`, answered `chat.sent` or
    `chat.refused` with the same `ref`)."""

    page = "chat"
    conversation_id: int | None = None
    forwarded = frozenset(
        {
            "chat.message",
            "chat.queued",
            "chat.token",
            "chat.done",
            "chat.error",
            "chat.conversation",
            "chat.models",
            "model.state",
            "model.progress",
            "model.list",
        }
    )

    async def admits(self, user: Any) -> bool:
        conversation_id = self.scope["url_route"]["kwargs"].get("conversation_id")
        if conversation_id is not None and not await self._owns(user, conversation_id):
            return False
        self.conversation_id = conversation_id
        return True

    def groups_of(self, user: Any) -> list[str]:
        groups = [user_group(user.pk), CHAT_GROUP]
        if self.conversation_id is not None:
            groups.append(conversation_group(self.conversation_id))
        return groups

    async def greet(self) -> None:
        await self.send_json({"type": "model.state", **await database_sync_to_async(chat_state)()})
        await self.send_json({"type": "chat.models", **await database_sync_to_async(self._models)()})

    def _models(self) -> dict[str, Any]:
        """The picker's list, with the models this user may have loaded by picking them (the broadcasts
        that follow carry the served ones: the page keeps its `loadable` list)."""
        return {**served_models(), "loadable": loadable_models(self.scope["user"].is_staff)}

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Sent here rather than POSTed, a message's answer starts sooner: no HTTP request to parse, no
        # middleware, no conversation to find first (its owner was checked at connect; the session is
        # checked again for each message, as a POST's would be).
        # In a web thread, as a POST would be (database_sync_to_async's one shared thread would queue every
        # socket's connect behind a post waiting for its request's head start).
        if isinstance(content, dict) and content.get("type") == "chat.send":
            reply = await in_web_thread(self._post, content.get("content"), content.get("ref"))
            await self.send_json(reply)
            if reply["type"] == "chat.refused" and reply["detail"] == SESSION_GONE:
                await self.close(code=SESSION_ENDED)

    async def refuse_malformed(self) -> None:
        await self.send_json(RefusedEvent(type="chat.refused", ref=None, detail=MALFORMED))

    def _post(self, text: Any, ref: Any) -> SentEvent | RefusedEvent:
        if not session_holds(self.scope["user"].pk, self.session_key):
            return RefusedEvent(type="chat.refused", ref=ref, detail=SESSION_GONE)
        if self.conversation_id is None:
            return RefusedEvent(type="chat.refused", ref=ref, detail="Open a conversation to send a message.")
        try:
            message = services.post_message(self.conversation_id, text)
        except ValidationError as exc:
            return RefusedEvent(type="chat.refused", ref=ref, detail=" ".join(exc.messages))
        return SentEvent(type="chat.sent", ref=ref, message=message.as_event())

    @database_sync_to_async
    def _owns(self, user: Any, conversation_id: int) -> bool:
        return Conversation.objects.owned_by(user).filter(pk=conversation_id).exists()
