from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from gantry import probes
from gantry.serving import checks_passwords

urlpatterns = [
    # The OpenAI-compatible API first: its calls are the most frequent, and URLs are tried in order.
    path("", include("gateway.urls")),
    # The Django admin's own login, in the login threads as the site's (it checks passwords the same way).
    path("django-admin/login/", checks_passwords(admin.site.login)),
    path("django-admin/", admin.site.urls),
    path("healthz", probes.healthz),
    path("readyz", probes.readyz),
    path("metrics", probes.metrics_view),
    path("", include("chat.urls")),
    path("", include("models_admin.urls")),
]
