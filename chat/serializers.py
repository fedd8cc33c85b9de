from __future__ import annotations

from rest_framework import serializers

from chat.models import Conversation


class ConversationSerializer(serializers.ModelSerializer):
    # The model its user picked; null: it follows the fleet's default model.
    model = serializers.SerializerMethodField()

    class Meta:
        model = Conversation
        fields = ["id", "title", "model", "created", "updated"]
        read_only_fields = ["id", "created", "updated"]

    def get_model(self, conversation: Conversation) -> str | None:
        return conversation.model_name or None


class MessageSerializer(serializers.Serializer):
    # Read only, and spelled out: a ModelSerializer builds its fields from the model on every use, and
    # the 202 of a new message is made while its answer's request is on its way.
    id = serializers.IntegerField(read_only=True)
    conversation = serializers.IntegerField(source="conversation_id", read_only=True)
    role = serializers.CharField(read_only=True)
    content = serializers.CharField(read_only=True)
    status = serializers.CharField(read_only=True)
    error = serializers.CharField(read_only=True)
    reply_to = serializers.IntegerField(source="reply_to_id", read_only=True, allow_null=True)
    model_name = serializers.CharField(read_only=True)
    created = serializers.DateTimeField(read_only=True)
