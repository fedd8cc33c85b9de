"""The chat API (DRF, session auth): the same rules as the pages, for scripts and tests.

Scripts (no `Origin` header) need no CSRF token; a browser request must come from this site and, once
logged in, carry the CSRF token (gantry/origins.py).
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import logout
from django.core.exceptions import ValidationError
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET
from rest_framework import status
from rest_framework.authentication import SessionAuthentication
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import services, usage
from chat.accounts import LoginRefused, log_in
from chat.models import Conversation, Message
from chat.serializers import ConversationSerializer, MessageSerializer
from gantry import origins

TITLE_EXAMPLE = '{"title": "Trip plans"}'
MODEL_EXAMPLE = '{"model": "Tiny-Chat-5M"} (or null: the default model)'
LOGIN_EXAMPLE = '{"username": "...", "password": "..."}'


def refuse_cross_site(request: Any) -> None:
    if not origins.from_this_site(request):
        raise PermissionDenied(origins.CROSS_SITE)


class OriginCheckedSessionAuthentication(SessionAuthentication):
    def authenticate_header(self, request: Any) -> str:
        return 'Session realm="gantry"'  # so anonymous callers get 401, not 403

    def enforce_csrf(self, request: Any) -> None:
        if refusal := origins.refusal(request):
            raise PermissionDenied(refusal)


class ChatAPIView(APIView):
    authentication_classes = [OriginCheckedSessionAuthentication]

    def conversation(self, request: Request, conversation_id: int) -> Conversation:
        return get_object_or_404(Conversation.objects.owned_by(request.user), pk=conversation_id)

    def own_message(self, request: Request, message_id: int) -> Message:
        return get_object_or_404(Message.objects.filter(conversation__owner_id=request.user.pk), pk=message_id)


def refused(exc: ValidationError) -> Response:
    return Response({"detail": " ".join(exc.messages)}, status=status.HTTP_400_BAD_REQUEST)


def field(request: Request, name: str, example: str, default: Any = None) -> Any:
    """A field of the JSON object sent, as sent (the service checks it, whichever way it came)."""
    if not isinstance(request.data, dict):
        raise ValidationError(f"Send a JSON object like {example}.")
    return request.data.get(name, default)


class ConversationList(ChatAPIView):
    def get(self, request: Request) -> Response:
        return Response(ConversationSerializer(Conversation.sidebar(request.user), many=True).data)

    def post(self, request: Request) -> Response:
        try:
            title, model = field(request, "title", TITLE_EXAMPLE, default=""), field(request, "model", TITLE_EXAMPLE)
            conversation = services.create_conversation(request.user, title, model)
        except ValidationError as exc:
            return refused(exc)
        return Response(ConversationSerializer(conversation).data, status=status.HTTP_201_CREATED)


class ConversationDetail(ChatAPIView):
    def get(self, request: Request, conversation_id: int) -> Response:
        return Response(ConversationSerializer(self.conversation(request, conversation_id)).data)

    def patch(self, request: Request, conversation_id: int) -> Response:
        conversation = self.conversation(request, conversation_id)
        try:
            picks_model = isinstance(request.data, dict) and "model" in request.data
            if picks_model:
                services.pick_model(conversation, field(request, "model", MODEL_EXAMPLE))
            if not picks_model or "title" in request.data:
                services.rename_conversation(conversation, field(request, "title", TITLE_EXAMPLE, default=""))
        except ValidationError as exc:
            return refused(exc)
        return Response(ConversationSerializer(conversation).data)

    def delete(self, request: Request, conversation_id: int) -> Response:
        services.delete_conversation(self.conversation(request, conversation_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class MessageList(ChatAPIView):
    def get(self, request: Request, conversation_id: int) -> Response:
        messages = self.conversation(request, conversation_id).messages.order_by("created", "id")
        return Response(MessageSerializer(messages, many=True).data)

    def post(self, request: Request, conversation_id: int) -> Response:
        conversation = self.conversation(request, conversation_id)
        try:
            message = services.post_message(conversation.pk, field(request, "content", '{"content": "Hello"}', default=""))
        except ValidationError as exc:
            return refused(exc)
        return Response(MessageSerializer(message).data, status=status.HTTP_202_ACCEPTED)


class MessageStop(ChatAPIView):
    def post(self, request: Request, message_id: int) -> Response:
        message = services.stop_message(self.own_message(request, message_id))
        return Response(MessageSerializer(message).data)


class MessageRetry(ChatAPIView):
    def post(self, request: Request, message_id: int) -> Response:
        try:
            message = services.retry_message(self.own_message(request, message_id))
        except ValidationError as exc:
            return refused(exc)
        return Response(MessageSerializer(message).data, status=status.HTTP_202_ACCEPTED)


class Login(APIView):
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    def post(self, request: Request) -> Response:
        refuse_cross_site(request)
        body = request.data if isinstance(request.data, dict) else {}
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            return Response({"detail": f"Send a JSON object like {LOGIN_EXAMPLE}."}, status=status.HTTP_400_BAD_REQUEST)
        try:
            # The lengths and characters are checked first, before any cache or database work.
            user = log_in(request._request, username, password)
        except LoginRefused as exc:
            return Response({"detail": exc.message}, status=exc.status)
        return Response({"username": user.get_username(), "is_admin": user.is_staff})


class Logout(ChatAPIView):
    permission_classes = [AllowAny]

    def post(self, request: Request) -> Response:
        logout(request._request)
        return Response({"detail": "Logged out."})


# The Admin Dashboard's Usage tab


def usage_days(given: str | None) -> int:
    """The period asked for, in days (today included); 30 when none is given."""
    if given is None:
        return 30
    if not given.strip().isdigit() or not 1 <= int(given) <= usage.MAX_DAYS:
        raise ValidationError(f"days is a whole number of days from 1 to {usage.MAX_DAYS}, like ?days=30.")
    return int(given)


@csrf_exempt  # it reads only: any other method is 405, not a CSRF refusal
@require_GET
def usage_report(request: HttpRequest) -> JsonResponse:
    """`GET /api/admin/usage?days=N`: every user's usage by model over the last N days, and each day's."""
    if not request.user.is_authenticated:
        return JsonResponse({"detail": "Log in as an admin first (POST /api/auth/login)."}, status=401)
    if not request.user.is_staff:
        return JsonResponse({"detail": "Only admins can read the usage."}, status=403)
    try:
        days = usage_days(request.GET.get("days"))
    except ValidationError as exc:
        return JsonResponse({"detail": " ".join(exc.messages)}, status=400)
    return JsonResponse(dict(usage.report(days)))
