"""Personal API keys: each acts as its user on the OpenAI-compatible API. Only a key's SHA-256 digest is
kept (a key is 256 random bits, so a fast hash loses nothing), with its first characters to recognise it."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models


class ApiKey(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16)  # the key's first characters, shown to tell keys apart
    digest = models.CharField(max_length=64, unique=True)  # SHA-256 of the key, hex
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def as_row(self) -> dict[str, Any]:
        return {
            "id": self.pk,
            "name": self.name,
            "prefix": self.prefix,
            "owner": self.owner.get_username(),
            "created": self.created.isoformat(),
            "last_used": self.last_used.isoformat() if self.last_used else None,
        }
