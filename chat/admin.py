from __future__ import annotations

from django.contrib import admin

from chat.models import Conversation, Message


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["title", "owner", "updated"]
    search_fields = ["title", "owner__username"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "conversation", "role", "status", "created"]
    list_filter = ["role", "status"]
