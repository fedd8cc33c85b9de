from __future__ import annotations

from django.urls import path, re_path
from django.views.generic import RedirectView

from models_admin import api, backends_api, settings_api, views

NAME = r"(?P<name>[a-z0-9-]{1,64})"

urlpatterns = [
    path("admin/", RedirectView.as_view(url="/admin/models/"), name="dashboard"),
    path("admin/models/", views.models_tab, name="models-tab"),
    path("admin/backends/", views.backends_tab, name="backends-tab"),
    path("admin/activity/", views.activity_tab, name="activity-tab"),
    path("api/admin/models", api.models),
    path("api/admin/models/switch", api.switch),
    path("api/admin/models/unload", api.unload),
    path("api/admin/models/refresh", api.refresh),
    path("api/admin/models/<str:model_id>/settings", settings_api.model_settings),
    path("admin/models/<str:model_id>/settings/", views.settings_page, name="model-settings"),
    re_path(r"^api/admin/backends/?$", backends_api.backends),
    re_path(rf"^api/admin/backends/{NAME}/?$", backends_api.backend),
    re_path(rf"^api/admin/backends/{NAME}/drain/?$", backends_api.drain),
    re_path(rf"^api/admin/backends/{NAME}/resume/?$", backends_api.resume),
    re_path(rf"^api/admin/backends/{NAME}/unload/?$", backends_api.unload),
    re_path(rf"^api/admin/backends/{NAME}/switch/?$", backends_api.switch),
]
