from __future__ import annotations

from django.urls import path

from models_admin.consumers import ModelsConsumer

websocket_urlpatterns = [path("ws/models/", ModelsConsumer.as_asgi())]
