from __future__ import annotations

from django.urls import path, re_path

from gateway import keys_api, pages, v1

urlpatterns = [
    path("v1/models", v1.models),
    path("v1/chat/completions", v1.chat_completions),
    path("v1/completions", v1.completions),
    re_path(r"^api/keys/?$", keys_api.KeyList.as_view()),
    re_path(r"^api/keys/(?P<key_id>[0-9]{1,18})/?$", keys_api.KeyDetail.as_view()),
    path("keys/", pages.keys_page, name="api-keys"),
]
