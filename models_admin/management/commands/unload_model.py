"""`manage.py unload_model`: unload the active model, as the dashboard does."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from models_admin import operations
from models_admin.models import Operation
from models_admin.tabby_errors import BackendAuthError


class Command(BaseCommand):
    help = "Unload the model TabbyAPI serves (running answers finish first)."

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            operation = operations.request_unload(None, Operation.Source.COMMAND)
        except operations.OperationConflict as exc:
            raise CommandError(f"Another operation is running ({exc.running}); try again when it ends.") from None
        except (BackendAuthError, operations.StillLoading) as exc:
            raise CommandError(exc.message) from None
        if operation is None:
            self.stdout.write("No model is loaded.")
            return
        operation = operations.wait_blocking(operation.pk)
        if operation.status != Operation.Status.SUCCEEDED:
            raise CommandError(f"Unloading failed: {operation.error}")
        self.stdout.write("Model unloaded successfully.")
