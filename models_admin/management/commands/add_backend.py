"""`manage.py add_backend NAME URL`: register a model server in the fleet (or update its address and keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from django.core.management.base import BaseCommand, CommandError, CommandParser

from models_admin import fleet
from models_admin.models import Backend


class Command(BaseCommand):
    help = "Register a TabbyAPI server as a backend of the fleet (what POST /api/admin/backends does)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="the backend's name: lowercase letters, digits and dashes")
        parser.add_argument("url", help="the server's address, like http://127.0.0.1:5001")
        parser.add_argument("--api-key", default="", help="its API key")
        parser.add_argument("--admin-key", default="", help="its admin key")
        parser.add_argument("--tokens-file", default="", help="its api_tokens.yml, to read both keys from")

    def handle(self, *args: Any, **options: Any) -> None:
        api_key, admin_key = options["api_key"], options["admin_key"]
        if options["tokens_file"]:
            tokens = yaml.safe_load(Path(options["tokens_file"]).read_text(encoding="utf-8")) or {}
            listed = tokens.get("api_key")
            api_key = api_key or str(listed[0] if isinstance(listed, list) else listed or "")
            admin_key = admin_key or str(tokens.get("admin_key") or "")
        body = {"name": options["name"], "url": options["url"], "api_key": api_key, "admin_key": admin_key}
        existing = Backend.objects.filter(name=options["name"]).first()
        try:
            if existing is not None:
                backend = fleet.edit(existing, {k: v for k, v in body.items() if k != "name"})
            else:
                backend = fleet.add(body)
        except fleet.FleetError as exc:
            raise CommandError(exc.message) from None
        model = backend.active_model or "none"
        self.stdout.write(f"Backend {backend.name} at {backend.base_url}: {backend.fleet_state}; model: {model}.")
