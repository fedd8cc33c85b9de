"""Server-rendered pages: login, logout, the chat page, and the Admin Dashboard's Usage tab."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth import logout
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from chat import usage
from chat.accounts import MAX_USERNAME, LoginRefused, log_in
from chat.api import usage_days
from chat.models import Conversation
from gantry import origins
from gantry.parsers import is_storable
from models_admin.services import chat_state, check_if_stale, default_backend, served_models
from models_admin.swap_scheduler import loadable_models


def login_page(request: HttpRequest) -> HttpResponse:
    next_url = request.POST.get("next") or request.GET.get("next") or "/"
    if not url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()}):
        next_url = "/"
    error, status, username = "", 200, ""
    if request.method == "POST":
        username = request.POST.get("username", "")
        try:
            if not origins.from_this_site(request):
                raise LoginRefused(origins.CROSS_SITE, 403)
            log_in(request, username, request.POST.get("password", ""))
        except LoginRefused as exc:
            error, status = exc.message, exc.status
        else:
            return HttpResponseRedirect(next_url)
    # The form shows the name typed again, unless no account could have it.
    shown = username if len(username) <= MAX_USERNAME and is_storable(username) else ""
    return render(request, "registration/login.html", {"error": error, "next": next_url, "username": shown}, status=status)


@require_POST
def logout_page(request: HttpRequest) -> HttpResponse:
    logout(request)
    return HttpResponseRedirect("/login/")


@login_required
def chat_page(request: HttpRequest, conversation_id: int | None = None) -> HttpResponse:
    conversations = Conversation.sidebar(request.user)
    current = next((c for c in conversations if c.pk == conversation_id), None)
    if conversation_id is not None and current is None:
        raise Http404("No such conversation.")
    backend = default_backend()
    check_if_stale(backend)  # the banner follows from the page's socket
    return render(
        request,
        "chat/chat.html",
        {
            "conversations": conversations,
            "current": current,
            "model": chat_state(backend),
            "models": {**served_models(), "loadable": loadable_models(request.user.is_staff)},
        },
    )


USAGE_PERIODS = [(1, "Today"), (7, "Last 7 days"), (30, "Last 30 days"), (90, "Last 90 days"), (365, "Last 365 days")]


@staff_member_required(login_url="/login/")
def usage_tab(request: HttpRequest) -> HttpResponse:
    """Every user's usage by model over a period (`?days=N`, 30 by default) and a chart of each day's
    tokens; the page asks the API again when another period is picked."""
    try:
        days = usage_days(request.GET.get("days"))
    except ValidationError:
        days = 30
    periods = USAGE_PERIODS if any(n == days for n, _ in USAGE_PERIODS) else [*USAGE_PERIODS, (days, f"Last {days} days")]
    context = {"tab": "usage", "report": usage.report(days), "days": days, "periods": periods}
    return render(request, "chat/usage.html", context)
