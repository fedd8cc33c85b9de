"""`manage.py ensure_user NAME [--password P] [--admin]`: create the account if missing."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Create a user (an admin with --admin) if missing; set the password when one is given."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--password", default="", help="the password (default: keep it, or generate one for a new user)")
        parser.add_argument("--admin", action="store_true", help="make the user an admin (staff and superuser)")

    def handle(self, *args: Any, username: str, password: str, admin: bool, **options: Any) -> None:
        user, created = get_user_model().objects.get_or_create(username=username)
        generated = ""
        if created and not password:
            password = generated = secrets.token_urlsafe(12)
        if password:
            user.set_password(password)
        if admin:
            user.is_staff = user.is_superuser = True
        user.save()
        role = "admin" if user.is_staff else "user"
        if generated:
            self.stdout.write(f"Created {role} {username} with the password {generated} (shown once).")
        else:
            self.stdout.write(f"{'Created' if created else 'Updated'} {role} {username}.")
