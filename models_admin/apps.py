from __future__ import annotations

from django.apps import AppConfig


class ModelsAdminConfig(AppConfig):
    name = "models_admin"
    verbose_name = "Models"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from gantry import metrics, probes
        from models_admin.metrics import ModelFigures, model_server_answers

        metrics.add_collector(ModelFigures())
        probes.add_check("model_server", model_server_answers)
