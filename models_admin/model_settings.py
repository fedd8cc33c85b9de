"""Per-model settings (load parameters, generation defaults, system prompt), kept by model name, and the
audit log of their changes. The fields and their checks are in settings_fields.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import Subquery

from models_admin import settings_fields
from models_admin.settings_fields import Values


class Source(models.TextChoices):
    """Where a change came from (as an operation's source)."""

    DASHBOARD = "dashboard"
    API = "api"
    COMMAND = "command"


class ModelSettingsQuerySet(models.QuerySet["ModelSettings"]):
    def values_of(self, model_name: str | Subquery) -> Values:
        """The model's settings ({} when it has none); `model_name` may be a subquery (the model a backend
        holds), which keeps the look-up to one query."""
        if isinstance(model_name, str):
            return self._values_by_name(model_name)
        row = self.filter(model_name=model_name).values_list("values", flat=True).first()
        return dict(row) if row else {}

    def _values_by_name(self, model_name: str) -> Values:
        # One plain statement: it runs for every answer before its request goes out, and the ORM takes
        # longer to build the query than the database takes to answer it.
        table, column = (connection.ops.quote_name(name) for name in (self.model._meta.db_table, "values"))
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {column} FROM {table} WHERE model_name = %s", [model_name])
            row = cursor.fetchone()
        if row is None:
            return {}
        stored = row[0]  # JSON text (SQLite; PostgreSQL's jsonb as Django reads it), or already decoded
        values = json.loads(stored) if isinstance(stored, (str, bytes)) else stored
        return dict(values) if values else {}

    def load_request(self, model_name: str) -> Values:
        """What every `POST /v1/model/load` of the model sends beside its name."""
        return settings_fields.load_request(self.values_of(model_name))


class ModelSettings(models.Model):
    """One model's settings, by its folder name (the same on every backend). `values` holds only what is
    set, checked by settings_fields.clean."""

    model_name = models.CharField(max_length=200, unique=True)
    values = models.JSONField(default=dict)
    updated = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    objects = ModelSettingsQuerySet.as_manager()

    class Meta:
        ordering = ["model_name"]
        verbose_name_plural = "model settings"

    def __str__(self) -> str:
        return self.model_name


class SettingsChange(models.Model):
    """The audit log of settings: who changed which of a model's settings, from what to what, when."""

    model_name = models.CharField(max_length=200)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.API)
    changes = models.JSONField(default=dict)  # {setting: [before, after]}, None for unset
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return f"settings of {self.model_name}: {', '.join(self.changes)}"

    def sides(self) -> tuple[str, str]:
        """The changed settings before and after, as the Activity tab's From and To columns."""
        # In the settings' own order (a JSON column may not keep the keys' order: PostgreSQL's does not).
        changed = [(f.name, self.changes[f.name]) for f in settings_fields.FIELDS if f.name in self.changes]
        before = "; ".join(f"{name} {_shown(old)}" for name, (old, _) in changed)
        after = "; ".join(f"{name} {_shown(new)}" for name, (_, new) in changed)
        return before, after


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f'"{value[:40]}…"' if len(value) > 40 else f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def save_settings(model_name: str, values: Values, user: Any, source: str) -> dict[str, list[Any]]:
    """Replace a model's settings with `values` (already checked) and log what changed; returns the
    changes ({} when nothing did: nothing is logged)."""
    with transaction.atomic():
        row, _ = ModelSettings.objects.select_for_update().get_or_create(model_name=model_name)
        changed = settings_fields.changes(row.values, values)
        if not changed:
            return {}
        row.values = values
        row.updated_by = user if getattr(user, "is_authenticated", False) else None
        row.save(update_fields=["values", "updated", "updated_by"])
        SettingsChange.objects.create(model_name=model_name, requested_by=row.updated_by, source=source, changes=changed)
    return changed
