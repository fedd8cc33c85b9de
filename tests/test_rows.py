"""Rows read by a plain statement (gantry.rows) are the instances the ORM reads: the same values, each
converted as the ORM converts it (aware datetimes, booleans, JSON), in the order asked, for the rows asked."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from chat.accounts import GuardedModelBackend
from chat.models import Conversation
from gantry.rows import Rows
from models_admin.model_settings import ModelSettings
from models_admin.models import Backend

pytestmark = pytest.mark.django_db


def values(instance: Any) -> dict[str, Any]:
    return {field.attname: getattr(instance, field.attname) for field in type(instance)._meta.concrete_fields}


def test_each_row_has_the_values_the_orm_reads_converted_alike() -> None:
    loaded = timezone.now() - timedelta(minutes=3)
    Backend.objects.create(name="default", base_url="http://127.0.0.1:9", active_model="Tiny", loaded_at=loaded, in_rotation=False)
    Backend.objects.create(name="second", base_url="http://127.0.0.1:8")
    ModelSettings.objects.create(model_name="Tiny", values={"pinned": True, "max_seq_len": 2048})

    backends = Rows(Backend, order_by="id").fetch()
    assert [values(b) for b in backends] == [values(b) for b in Backend.objects.order_by("id")]
    assert backends[0].loaded_at == loaded and timezone.is_aware(backends[0].loaded_at)
    assert backends[0].in_rotation is False and backends[1].in_rotation is True
    assert not backends[0]._state.adding  # saved rows, as the ORM's: saving one updates it
    (settings,) = Rows(ModelSettings).fetch()
    assert settings.values == {"pinned": True, "max_seq_len": 2048}
    locking = Rows(Backend, "name = %s", for_update=True)
    assert locking.sql.endswith(" FOR UPDATE") == connection.features.has_select_for_update  # SQLite locks the whole file
    with transaction.atomic():
        assert [values(b) for b in locking.fetch(["second"])] == [values(backends[1])]


def test_only_the_rows_asked_in_the_order_asked() -> None:
    alice, bob = (User.objects.create_user(name) for name in ("alice", "bob"))
    older = Conversation.objects.create(owner=alice, title="older")
    newer = Conversation.objects.create(owner=alice, title="newer")
    Conversation.objects.create(owner=alice, title="an API request", source=Conversation.Source.API)
    Conversation.objects.create(owner=bob, title="bob's")

    assert [c.title for c in Conversation.sidebar(alice)] == ["newer", "older"]
    Conversation.objects.filter(pk=older.pk).update(updated=newer.updated + timedelta(seconds=1))
    assert Conversation.sidebar(alice) == list(Conversation.objects.owned_by(alice).in_chat())
    assert [c.title for c in Conversation.sidebar(alice)] == ["older", "newer"]
    assert Rows(Conversation, "title = %s").first(["nobody's"]) is None


def test_a_session_user_is_one_statement_and_an_inactive_one_is_nobody() -> None:
    user = User.objects.create_user("carol", is_staff=True)
    backend = GuardedModelBackend()
    with CaptureQueriesContext(connection) as queries:
        found = backend.get_user(user.pk)
    assert len(queries) == 1
    assert found == user and values(found) == values(user) and found.is_staff
    User.objects.filter(pk=user.pk).update(is_active=False)
    assert backend.get_user(user.pk) is None
    assert backend.get_user(user.pk + 1000) is None
