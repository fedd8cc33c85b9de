from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from gantry import probes

urlpatterns = [
    path("django-admin/", admin.site.urls),
    path("healthz", probes.healthz),
    path("readyz", probes.readyz),
    path("metrics", probes.metrics_view),
    path("", include("chat.urls")),
    path("", include("models_admin.urls")),
]
