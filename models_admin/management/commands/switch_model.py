"""`manage.py switch_model NAME`: switch the active model, as the dashboard does."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from models_admin import operations
from models_admin.models import Operation
from models_admin.tabby_errors import BackendAuthError


class Command(BaseCommand):
    help = "Switch the model TabbyAPI serves (unload the current one, load NAME), with the same checks as the API."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="the model's folder name, as GET /api/admin/models lists it")

    def handle(self, *args: Any, name: str, **options: Any) -> None:
        try:
            operation = operations.request_switch(name, None, Operation.Source.COMMAND)
        except operations.UnknownModel:
            raise CommandError(f"There is no model named {name}.") from None
        except operations.OperationConflict as exc:
            raise CommandError(f"Another operation is running ({exc.running}); try again when it ends.") from None
        except (BackendAuthError, operations.StillLoading) as exc:
            raise CommandError(exc.message) from None
        if operation is None:
            self.stdout.write(f"{name} is already the active model.")
            return
        operation = operations.wait_blocking(operation.pk)
        if operation.status != Operation.Status.SUCCEEDED:
            raise CommandError(f"Switching to {name} failed: {operation.error}")
        self.stdout.write(f"Model switched to {name} in {operation.duration:.1f} s.")
