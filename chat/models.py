from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models


class ConversationQuerySet(models.QuerySet):
    def owned_by(self, user: Any) -> ConversationQuerySet:
        return self.filter(owner=user)


class Conversation(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, default="New conversation")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    objects = ConversationQuerySet.as_manager()

    class Meta:
        ordering = ["-updated", "-id"]

    def __str__(self) -> str:
        return self.title

    def as_event(self) -> dict[str, Any]:
        return {"id": self.pk, "title": self.title, "created": self.created.isoformat(), "updated": self.updated.isoformat()}


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        QUEUED = "queued"
        GENERATING = "generating"
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DONE)
    error = models.TextField(blank=True, default="")
    # The user message an answer replies to (the answer of a retried message is the same row again).
    reply_to = models.OneToOneField("self", null=True, blank=True, on_delete=models.CASCADE, related_name="answer")
    model_name = models.CharField(max_length=200, blank=True, default="")
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created", "id"]
        indexes = [models.Index(fields=["status", "created"])]

    def __str__(self) -> str:
        return f"{self.role} {self.pk} ({self.status})"

    def as_event(self) -> dict[str, Any]:
        return {
            "id": self.pk,
            "conversation_id": self.conversation_id,
            "role": self.role,
            "content": self.content,
            "status": self.status,
            "error": self.error,
            "reply_to": self.reply_to_id,
            "model_name": self.model_name,
            "created": self.created.isoformat(),
        }
