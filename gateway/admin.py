from __future__ import annotations

from typing import Any

from django.contrib import admin

from gateway.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Keys are made on the API keys page (the key is shown there once); here they are listed and deleted."""

    list_display = ["name", "owner", "prefix", "created", "last_used"]
    search_fields = ["name", "owner__username", "prefix"]
    readonly_fields = ["owner", "name", "prefix", "created", "last_used"]
    exclude = ["digest"]

    def has_add_permission(self, request: Any) -> bool:
        return False
