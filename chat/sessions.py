"""A session's end closes its sockets: logging out closes that session's; a changed password, a lost
admin right, a deactivated or deleted account closes every socket of the account.

The receivers below are connected when the app is ready (chat/apps.py), in every process: a password
set by `manage.py` or in Django's admin site closes the user's sockets in every web process.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver
from django.http import HttpRequest

from gantry.sockets import end_sessions

User = get_user_model()
# What ends every session of an account: its sockets close, and its pages land on the login page.
SESSION_FIELDS = ("password", "is_active", "is_staff")


@receiver(user_logged_out)
def close_the_sessions_sockets(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    """Sent before Django empties the session, so its key is still the one its sockets know. Emptied here
    first (Django's own emptying right after finds nothing left to do): a page told of the end reloads at
    once, and must find the session gone, not still there for a moment."""
    session_key = request.session.session_key if request is not None else None
    if request is None or user is None or not session_key:
        return
    request.session.flush()
    end_sessions(user.pk, session_key)


@receiver(pre_save, sender=User)
def note_a_changed_account(sender: Any, instance: Any, update_fields: Any = None, **kwargs: Any) -> None:
    if instance.pk is None or (update_fields is not None and not set(update_fields) & set(SESSION_FIELDS)):
        return  # a new account, or a save of other fields (a login's last_login)
    before = sender.objects.filter(pk=instance.pk).values_list(*SESSION_FIELDS).first()
    instance._gantry_sessions_end = before is not None and before != tuple(getattr(instance, f) for f in SESSION_FIELDS)


@receiver(post_save, sender=User)
def close_a_changed_accounts_sockets(sender: Any, instance: Any, **kwargs: Any) -> None:
    if getattr(instance, "_gantry_sessions_end", False):
        instance._gantry_sessions_end = False
        user_id = instance.pk
        transaction.on_commit(lambda: end_sessions(user_id))


@receiver(post_delete, sender=User)
def close_a_deleted_accounts_sockets(sender: Any, instance: Any, **kwargs: Any) -> None:
    user_id = instance.pk
    transaction.on_commit(lambda: end_sessions(user_id))
