"""`GET`/`PUT /api/admin/models/<model_id>/settings`: a model's settings, with the admin API's access
rules and error shapes (models_admin.api). A model is known once Gantry has seen it on a backend or it
has settings (from a fleet file, say); any other name is 404, so a typo does not make settings nobody uses.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_http_methods

from gantry.parsers import loads
from models_admin.api import admin_api, detail
from models_admin.model_settings import ModelSettings, SettingsChange, Source, save_settings
from models_admin.models import Backend, LanguageModel
from models_admin.settings_fields import SettingsInvalid, clean, every_field

INVALID = "Some settings were not saved: see `errors`, one sentence per setting."


def is_known(model_id: str) -> bool:
    return LanguageModel.objects.filter(name=model_id).exists() or ModelSettings.objects.filter(model_name=model_id).exists()


def settings_document(model_id: str) -> dict[str, Any]:
    """The API's (and the form's) view of a model's settings: every setting, null where unset."""
    row = ModelSettings.objects.select_related("updated_by").filter(model_name=model_id).first()
    loaded = Backend.objects.filter(active_model=model_id, state=Backend.State.READY).exists()
    return {
        "model_id": model_id,
        "settings": every_field(row.values if row else {}),
        "updated": row.updated.isoformat() if row and row.values else None,
        "updated_by": row.updated_by.get_username() if row and row.values and row.updated_by else None,
        # Load parameters apply from the next load: while the model is loaded, a switch to it applies them.
        "loaded": loaded,
    }


@require_http_methods(["GET", "PUT"])
@admin_api
def model_settings(request: HttpRequest, model_id: str) -> JsonResponse:
    if not is_known(model_id):
        return detail(f"There is no model named {model_id}.", 404)
    if request.method == "PUT":
        body = _json(request)
        try:
            values = clean(body, settings.GANTRY_MAX_ANSWER_TOKENS)
        except SettingsInvalid as exc:
            return detail(INVALID, 400, errors=exc.errors)
        source = Source.DASHBOARD if request.headers.get("X-Gantry-Source") == "dashboard" else Source.API
        changed = save_settings(model_id, values, request.user, source)
        return JsonResponse({**settings_document(model_id), "changed": sorted(changed)})
    return JsonResponse(settings_document(model_id))


def _json(request: HttpRequest) -> object:
    try:
        return loads(request.body or b"null")
    except ValueError:
        return None


def recent_changes(model_id: str, limit: int = 10) -> list[SettingsChange]:
    return list(SettingsChange.objects.filter(model_name=model_id).select_related("requested_by")[:limit])
