"""`manage.py import_fleet FILE [--dry-run]`: set the backends and model settings a fleet file describes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from models_admin.fleet_file import FleetInvalid, import_fleet, read_fleet


class Command(BaseCommand):
    help = (
        "Read a fleet file (as export_fleet writes it): check all of it, then add or update its backends and "
        "model settings in one transaction (nothing is written if any part is wrong). Removes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path, help="the YAML file; - for standard input")
        parser.add_argument("--dry-run", action="store_true", help="check and report what would change, write nothing")

    def handle(self, *args: Any, file: Path, dry_run: bool = False, **options: Any) -> None:
        try:
            text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"Cannot read {file}: {exc}") from None
        try:
            fleet = read_fleet(text)
        except FleetInvalid as exc:
            raise CommandError(
                f"{file} was not imported; nothing changed:\n" + "\n".join(f"- {p}" for p in exc.problems)
            ) from None
        report = import_fleet(fleet, dry_run=dry_run)
        for line in report.lines:
            self.stdout.write(f"  {line}")
        self.stdout.write(("Would import (dry run, nothing written): " if dry_run else f"Imported {file}: ") + report.summary())
