"""Making, finding and revoking personal API keys.

A key is shown once, when it is made; Gantry keeps its SHA-256 digest. A key acts as its user: a key
of a deactivated account is refused, and its requests wait in the queue within its user's share.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import Q, QuerySet
from django.utils import timezone

from chat.accounts import users_by_id
from gantry.parsers import is_storable
from gantry.rows import Rows
from gateway.models import ApiKey

KEY_PREFIX = "gsk_"
SHOWN_CHARACTERS = 12  # of a key, kept to tell keys apart (the prefix and 8 random characters)
NAME_LIMIT = ApiKey._meta.get_field("name").max_length or 100
KEYS_PER_USER = 50
LONGEST_KEY = 200  # anything longer is no key of ours, and is refused before it is hashed
TOUCH_EVERY = timedelta(seconds=60)  # `last_used` is written at most this often per key
KEY_WITH_DIGEST = Rows(ApiKey, "digest = %s")
# When each key (by digest) was last found valid in this process. Only a hint, never a permission: an
# answer's request may go out on it before the key is looked up again (gateway.exchange), and no answer
# is shown before that look-up.
_found_valid: dict[str, float] = {}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def checked_name(name: object) -> str:
    if not isinstance(name, str):
        raise ValidationError('Send the key\'s name as text, like {"name": "laptop"}.')
    if not is_storable(name):
        raise ValidationError("This name has a character that cannot be stored (a NUL character or half of a surrogate pair).")
    name = " ".join(name.split())
    if not name:
        raise ValidationError('Give the key a name, to tell it apart from your other keys ("laptop", "notebook server").')
    if len(name) > NAME_LIMIT:
        raise ValidationError(f"This name has {len(name):,} characters; the limit is {NAME_LIMIT}.")
    return name


def create_key(user: Any, name: object) -> tuple[ApiKey, str]:
    """A new key of `user`: its row and the key itself, which is never shown again."""
    name = checked_name(name)
    if ApiKey.objects.filter(owner=user).count() >= KEYS_PER_USER:
        raise ValidationError(f"You already have {KEYS_PER_USER} keys, the limit. Revoke one you no longer use first.")
    key = new_key()
    row = ApiKey.objects.create(owner=user, name=name, prefix=key[:SHOWN_CHARACTERS], digest=digest(key))
    return row, key


def visible_keys(user: Any) -> QuerySet[ApiKey]:
    """The keys `user` sees and may revoke: their own; an admin's, everyone's."""
    keys = ApiKey.objects.select_related("owner")
    return keys if user.is_staff else keys.filter(owner=user)


def revoke(user: Any, key_id: int) -> bool:
    """Revoke a key `user` may see; False when there is none such."""
    deleted, _ = visible_keys(user).filter(pk=key_id).delete()
    _found_valid.clear()
    return bool(deleted)


def found_valid_within(key: str, seconds: float) -> bool:
    """Whether this process found `key` valid within the last `seconds` (a hint: see `_found_valid`)."""
    if not key or len(key) > LONGEST_KEY or not key.isascii():
        return False
    return time.monotonic() - _found_valid.get(digest(key), -seconds - 1) <= seconds


def user_of(key: str) -> Any | None:
    """The active user whose key this is (and the key's last use noted), or None."""
    if not key or len(key) > LONGEST_KEY or not key.isascii():
        return None
    # Plain statements built once (gantry.rows): the ORM takes several times longer to build a query
    # this small than the database takes to answer it, on the way of every request.
    found = KEY_WITH_DIGEST.first([digest(key)])
    if found is None:
        _found_valid.pop(digest(key), None)
        return None
    user = users_by_id().first([found.owner_id])
    if user is None or not user.is_active:
        _found_valid.pop(found.digest, None)
        return None
    _found_valid[found.digest] = time.monotonic()
    now = timezone.now()
    if found.last_used is None or now - found.last_used >= TOUCH_EVERY:
        stale = Q(last_used__isnull=True) | Q(last_used__lt=now - TOUCH_EVERY)
        ApiKey.objects.filter(stale, pk=found.pk).update(last_used=now)
    return user
