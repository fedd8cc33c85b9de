from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import ValidationError

from chat.models import Conversation, Message


class GuardedAdminLoginForm(AdminAuthenticationForm):
    """The Django admin's login says why a password was not checked (too many wrong ones), as the site's does;
    the lockout itself is the authentication backend's (chat/accounts.py)."""

    def get_invalid_login_error(self) -> ValidationError:
        refusal = getattr(self.request, "login_refusal", None)
        if refusal is not None:
            return ValidationError(refusal.message, code="locked_out")
        return super().get_invalid_login_error()


admin.site.login_form = GuardedAdminLoginForm


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["title", "owner", "updated"]
    search_fields = ["title", "owner__username"]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "conversation", "role", "status", "created"]
    list_filter = ["role", "status"]
