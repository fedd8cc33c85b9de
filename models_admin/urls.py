from __future__ import annotations

from django.urls import path

from models_admin import views

urlpatterns = [
    path("admin/", views.dashboard, name="dashboard"),
]
