"""Personal API keys through the API, with a session (the same access rules as the chat API):
`GET`, `POST /api/keys {"name"}` and `DELETE /api/keys/<id>/`. Admins see and revoke every key."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.http import Http404
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from chat.api import ChatAPIView, field, refused
from gateway import keys


class KeyList(ChatAPIView):
    def get(self, request: Request) -> Response:
        return Response([key.as_row() for key in keys.visible_keys(request.user)])

    def post(self, request: Request) -> Response:
        try:
            row, key = keys.create_key(request.user, field(request, "name", '{"name": "laptop"}', default=""))
        except ValidationError as exc:
            return refused(exc)
        # The key's only appearance: Gantry keeps its digest.
        return Response({**row.as_row(), "key": key}, status=status.HTTP_201_CREATED)


class KeyDetail(ChatAPIView):
    def delete(self, request: Request, key_id: str) -> Response:
        if not keys.revoke(request.user, int(key_id)):
            raise Http404("There is no such key.")
        return Response(status=status.HTTP_204_NO_CONTENT)
