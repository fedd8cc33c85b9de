from __future__ import annotations

from rest_framework import serializers

from chat.models import Conversation, Message


class ConversationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Conversation
        fields = ["id", "title", "created", "updated"]
        read_only_fields = ["id", "created", "updated"]


class MessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = ["id", "conversation", "role", "content", "status", "error", "reply_to", "model_name", "created"]
        read_only_fields = fields


class NewMessageSerializer(serializers.Serializer):
    # The length limit is checked by the service, with a sentence naming it.
    content = serializers.CharField(trim_whitespace=False, allow_blank=True)


class LoginSerializer(serializers.Serializer):
    username = serializers.CharField()
    password = serializers.CharField(trim_whitespace=False)
