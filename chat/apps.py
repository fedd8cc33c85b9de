from __future__ import annotations

from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from chat import receivers  # noqa: F401  (connects to the Models app's signals, and to logins')
        from chat.metrics import ChatFigures
        from gantry import metrics

        metrics.add_collector(ChatFigures())
