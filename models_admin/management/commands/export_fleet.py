"""`manage.py export_fleet [--output FILE]`: the fleet (backends without their keys, model settings) as YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from models_admin.fleet_file import export_fleet


class Command(BaseCommand):
    help = "Write the fleet (backends without their keys, and each model's settings) as YAML, to keep in git."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--output", "-o", type=Path, help="the file to write (default: standard output)")

    def handle(self, *args: Any, output: Path | None = None, **options: Any) -> None:
        text = export_fleet()
        if output is None:
            self.stdout.write(text, ending="")
            return
        output.write_text(text, encoding="utf-8")
        self.stdout.write(f"Fleet written to {output}.")
