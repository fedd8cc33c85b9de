from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models


class Backend(models.Model):
    """A TabbyAPI server and what Gantry knows of it. One row today; several later."""

    class State(models.TextChoices):
        READY = "ready"
        SWITCHING = "switching"
        UNLOADING = "unloading"
        UNLOADED = "unloaded"
        FAILED = "failed"

    name = models.CharField(max_length=100, unique=True, default="default")
    base_url = models.CharField(max_length=500)
    state = models.CharField(max_length=16, choices=State.choices, default=State.UNLOADED)
    active_model = models.CharField(max_length=200, blank=True, default="")
    target_model = models.CharField(max_length=200, blank=True, default="")
    refreshed_at = models.DateTimeField(null=True, blank=True)
    updated = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.name

    @property
    def is_ready(self) -> bool:
        return self.state == self.State.READY and bool(self.active_model)

    def as_event(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "active_model": self.active_model or None,
            "target_model": self.target_model or None,
        }


class LanguageModel(models.Model):
    """A model folder seen on a backend."""

    backend = models.ForeignKey(Backend, on_delete=models.CASCADE, related_name="models")
    name = models.CharField(max_length=200)
    present = models.BooleanField(default=True)
    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["backend", "name"], name="unique_model_per_backend")]

    def __str__(self) -> str:
        return self.name


def default_base_url() -> str:
    return str(settings.TABBY_HOST)
