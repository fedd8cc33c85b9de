from __future__ import annotations

from django.urls import path

from chat import api, views
from gantry.serving import checks_passwords

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("c/<int:conversation_id>/", views.chat_page, name="conversation"),
    path("login/", checks_passwords(views.login_page), name="login"),
    path("logout/", views.logout_page, name="logout"),
    path("api/auth/login", checks_passwords(api.Login.as_view())),
    path("api/auth/logout", api.Logout.as_view()),
    path("api/conversations/", api.ConversationList.as_view()),
    path("api/conversations/<int:conversation_id>/", api.ConversationDetail.as_view()),
    path("api/conversations/<int:conversation_id>/messages/", api.MessageList.as_view()),
    path("api/messages/<int:message_id>/stop/", api.MessageStop.as_view()),
    path("api/messages/<int:message_id>/retry/", api.MessageRetry.as_view()),
    path("admin/usage/", views.usage_tab, name="usage-tab"),
    path("api/admin/usage", api.usage_report),
]
