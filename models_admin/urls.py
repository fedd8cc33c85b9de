from __future__ import annotations

from django.urls import path
from django.views.generic import RedirectView

from models_admin import api, settings_api, views

urlpatterns = [
    path("admin/", RedirectView.as_view(url="/admin/models/"), name="dashboard"),
    path("admin/models/", views.models_tab, name="models-tab"),
    path("admin/activity/", views.activity_tab, name="activity-tab"),
    path("api/admin/models", api.models),
    path("api/admin/models/switch", api.switch),
    path("api/admin/models/unload", api.unload),
    path("api/admin/models/refresh", api.refresh),
    path("api/admin/models/<str:model_id>/settings", settings_api.model_settings),
    path("admin/models/<str:model_id>/settings/", views.settings_page, name="model-settings"),
]
