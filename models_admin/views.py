from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


@staff_member_required(login_url="/login/")
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "models_admin/dashboard.html")
