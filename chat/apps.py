from __future__ import annotations

from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from chat import receivers, sessions  # noqa: F401  (connect to logins', accounts' and the Models app's signals)
        from chat.metrics import ChatFigures
        from gantry import metrics

        metrics.add_collector(ChatFigures())
