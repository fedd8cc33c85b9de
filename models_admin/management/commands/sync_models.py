"""`manage.py sync_models`: take the model list and the loaded model from TabbyAPI now."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from models_admin.runner import reconcile_stale_operations
from models_admin.services import model_rows, sync_models
from models_admin.tabby_errors import BackendError


class Command(BaseCommand):
    help = "Refresh the model list and the active model from TabbyAPI (what the periodic refresh does)."

    def handle(self, *args: Any, **options: Any) -> None:
        reconcile_stale_operations()
        try:
            backend = sync_models(strict=True)
        except BackendError as exc:
            raise CommandError(exc.message) from None
        rows = model_rows(backend)
        active = backend.active_model or "none"
        self.stdout.write(f"{len(rows)} models; active: {active}; state: {backend.state}.")
