from __future__ import annotations

from django.apps import AppConfig


class ModelsAdminConfig(AppConfig):
    name = "models_admin"
    verbose_name = "Models"
    default_auto_field = "django.db.models.BigAutoField"
