"""The profile's "API keys" page: make, copy once, and revoke personal keys (admins: everyone's)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from gateway.keys import visible_keys


@login_required
def keys_page(request: HttpRequest) -> HttpResponse:
    base_url = request.build_absolute_uri("/v1")
    return render(request, "gateway/keys.html", {"keys": visible_keys(request.user), "base_url": base_url})
