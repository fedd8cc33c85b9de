from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("django-admin/", admin.site.urls),
    path("", include("chat.urls")),
    path("", include("models_admin.urls")),
]
