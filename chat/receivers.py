"""What chat does when the Models app announces something (it never imports chat)."""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver

from chat.models import Message
from models_admin.signals import count_running_answers


@receiver(count_running_answers)
def running_answers(sender: Any, **kwargs: Any) -> int:
    return Message.objects.answering().count()
