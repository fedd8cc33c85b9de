"""The swap scheduler's choices against database rows: which backend it swaps for held requests (an idle
one first, else the least recently used), how it groups requests by model without letting one wait longer
than GANTRY_MAX_SWAP_WAIT, and what it never does (unload a pinned model or one short of its minimum
residency, load for a sender the model's policy does not allow, swap during a fleet switch). The held
requests are chat's queued messages, read through the `list_held` signal as the watchers read them. The
live swaps are in tests/gateway/test_swap_on_request.py."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.utils import timezone

from chat.generation import _finish
from chat.models import Conversation, Message
from models_admin.model_settings import ModelSettings
from models_admin.models import Backend, LanguageModel, Operation, Roll
from models_admin.signals import held_messages
from models_admin.swap_scheduler import LoadRefused, check_request, loadable_models, plan, schedule_swaps

TINY, SMALL, LARGE = "Tiny-Chat-5M", "Small-Chat-200M", "Large-Chat-1G"
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def swap_wait(settings: Any) -> None:
    settings.GANTRY_MAX_SWAP_WAIT = 10.0


@pytest.fixture
def member() -> User:
    return User.objects.create_user("member", password="pw-member-123")


@pytest.fixture
def admin() -> User:
    return User.objects.create_user("root", password="pw-root-123", is_staff=True)


def everyone(*models: str, **policy: Any) -> None:
    for model in models:
        ModelSettings.objects.update_or_create(model_name=model, defaults={"values": {"load_on_request": "everyone", **policy}})


def backend(name: str, model: str = "", loaded: float = 600, used: float | None = None, **fields: Any) -> Backend:
    """A backend with every demo model's folder, holding `model` since `loaded` seconds ago (last used
    `used` seconds ago)."""
    now = timezone.now()
    row = Backend.objects.create(
        **{
            "name": name,
            "base_url": f"http://127.0.0.1:9/{name}",
            "state": Backend.State.READY if model else Backend.State.UNLOADED,
            "active_model": model,
            "desired_model": model,
            "loaded_at": now - timedelta(seconds=loaded) if model else None,
            "used_at": now - timedelta(seconds=used) if used is not None else None,
            **fields,
        }
    )
    for folder in (TINY, SMALL, LARGE):
        LanguageModel.objects.create(backend=row, name=folder)
    return row


def held(user: User, model: str, waited: float = 0.0) -> Message:
    """A message queued `waited` seconds ago in a conversation that picked `model` ("": the default)."""
    conversation = Conversation.objects.create(owner=user, model_name=model)
    message = Message.objects.create(
        conversation=conversation, role=Message.Role.USER, content="Hello", status=Message.Status.QUEUED
    )
    Message.objects.filter(pk=message.pk).update(updated=timezone.now() - timedelta(seconds=waited))
    return message


def answering(user: User, on: Backend) -> Message:
    conversation = Conversation.objects.create(owner=user, model_name=on.active_model)
    return Message.objects.create(
        conversation=conversation, role=Message.Role.USER, content="Hi", status=Message.Status.GENERATING, backend=on
    )


def chosen(now: datetime | None = None) -> list[tuple[str, str]]:
    fleet = list(Backend.objects.order_by("name"))
    return [(swap.model, swap.backend.name) for swap in plan(fleet, held_messages(), now or timezone.now())]


def test_an_empty_backend_is_taken_first_then_an_idle_one_the_least_recently_used(member: User) -> None:
    everyone(SMALL)
    backend("default", TINY, used=5)
    backend("gpu-2", LARGE, used=50)
    backend("gpu-3", TINY, used=20)
    held(member, SMALL)
    assert chosen() == [(SMALL, "gpu-2")]  # all idle: the one unused the longest
    backend("gpu-4")
    assert chosen() == [(SMALL, "gpu-4")]  # one holding nothing comes before


def test_the_default_backend_is_swapped_last_among_equals(member: User) -> None:
    everyone(SMALL)
    backend("default")
    backend("gpu-2")
    held(member, SMALL)
    assert chosen() == [(SMALL, "gpu-2")]


def test_a_busy_model_serves_its_group_before_being_swapped_but_not_past_the_bound(member: User) -> None:
    everyone(SMALL)
    default = backend("default", TINY, loaded=600)
    answering(member, default)
    held(member, SMALL, waited=4)
    assert chosen() == []  # Tiny answers: the request for Small waits for it (the group)
    Message.objects.filter(status=Message.Status.GENERATING).update(status=Message.Status.DONE)
    held(member, TINY, waited=1)
    assert chosen() == []  # none runs, but a request waits for Tiny: still its group's turn
    Message.objects.filter(conversation__model_name=SMALL).update(updated=timezone.now() - timedelta(seconds=11))
    assert chosen() == [(SMALL, "default")]  # the request for Small waited GANTRY_MAX_SWAP_WAIT: swapped anyway
    Message.objects.filter(conversation__model_name=TINY).delete()
    Message.objects.filter(conversation__model_name=SMALL).update(updated=timezone.now())
    assert chosen() == [(SMALL, "default")]  # nothing for Tiny: idle, swapped at once


def test_the_bound_counts_from_when_the_request_was_queued(member: User) -> None:
    """A model just loaded for its own group is swapped away as soon as a request for another model has
    waited GANTRY_MAX_SWAP_WAIT since it was queued (through that load too): no request waits longer
    than the bound and the load under way, then its own model's load."""
    everyone(SMALL)
    default = backend("default", TINY, loaded=1)
    answering(member, default)
    held(member, SMALL, waited=9)
    assert chosen() == []
    Message.objects.filter(conversation__model_name=SMALL).update(updated=timezone.now() - timedelta(seconds=10))
    assert chosen() == [(SMALL, "default")]


def test_a_model_just_loaded_serves_the_requests_it_was_loaded_for_first(member: User) -> None:
    """The requests queued before its load are released the moment it is ready: a swap in between would
    leave them for another round of loads."""
    everyone(SMALL)
    default = backend("default", TINY, loaded=0.5)
    held(member, TINY, waited=4)  # what Tiny was loaded for, not yet released
    held(member, SMALL, waited=12)
    assert chosen() == []
    Message.objects.filter(conversation__model_name=TINY).update(status=Message.Status.GENERATING, backend=default)
    held(member, TINY)  # a request that came after the load does not keep it
    assert chosen() == [(SMALL, "default")]


def test_a_pinned_model_is_never_unloaded_for_another_models_requests(member: User) -> None:
    everyone(SMALL)
    everyone(TINY, pinned=True)
    backend("default", TINY, used=500)
    held(member, SMALL, waited=1000)
    assert chosen() == []  # idle, and its request waited long: still pinned
    backend("gpu-2", LARGE, used=1)
    assert chosen() == [(SMALL, "gpu-2")]


def test_a_model_short_of_its_minimum_residency_stays(member: User) -> None:
    everyone(SMALL)
    everyone(TINY, min_residency=120)
    default = backend("default", TINY, loaded=60)
    held(member, SMALL, waited=100)
    assert chosen() == []
    Backend.objects.filter(pk=default.pk).update(loaded_at=timezone.now() - timedelta(seconds=121))
    assert chosen() == [(SMALL, "default")]


def test_only_a_sender_the_policy_allows_has_a_model_loaded(member: User, admin: User) -> None:
    backend("default", TINY)
    held(member, SMALL, waited=5)
    assert chosen() == []  # load_on_request defaults to admins
    held(admin, SMALL)
    assert chosen() == [(SMALL, "default")]
    ModelSettings.objects.create(model_name=SMALL, values={"load_on_request": "nobody"})
    assert chosen() == []


def test_nothing_is_swapped_for_a_model_held_loading_or_followed_by_default(member: User) -> None:
    everyone(SMALL, TINY)
    backend("default", TINY)
    loading = backend("gpu-2", LARGE, state=Backend.State.SWITCHING, target_model=SMALL)
    held(member, SMALL)
    held(member, TINY)
    held(member, "")  # follows the default model (Tiny): never loads anything
    assert chosen() == []
    Backend.objects.filter(pk=loading.pk).update(state=Backend.State.READY, target_model="")
    assert chosen() == [(SMALL, "gpu-2")]


def test_each_model_gets_its_own_backend_and_busy_or_drained_ones_are_left(member: User) -> None:
    everyone(SMALL, LARGE)
    backend("default", TINY)
    backend("gpu-2", state=Backend.State.UNLOADED, in_rotation=False)
    backend("gpu-3", state=Backend.State.UNREACHABLE, trouble=Backend.Trouble.UNREACHABLE)
    backend("gpu-4")
    held(member, LARGE, waited=2)
    held(member, SMALL, waited=1)
    assert chosen() == [(LARGE, "gpu-4"), (SMALL, "default")]  # the oldest request first


def test_a_swap_is_a_switch_audited_with_the_source_request_and_the_user(member: User) -> None:
    everyone(SMALL)
    default = backend("default", TINY)
    held(member, SMALL)
    operations = schedule_swaps()
    assert [(op.kind, op.source, op.to_model, op.from_model, op.requested_by) for op in operations] == [
        (Operation.Kind.SWITCH, Operation.Source.REQUEST, SMALL, TINY, member)
    ]
    default.refresh_from_db()
    assert (default.state, default.target_model, default.operation_id) == (Backend.State.SWITCHING, SMALL, operations[0].pk)
    assert schedule_swaps() == []  # the next round sees it loading


def test_nothing_is_swapped_during_a_fleet_switch_or_after_a_failed_load(member: User) -> None:
    everyone(SMALL)
    default = backend("default", TINY)
    held(member, SMALL)
    roll = Roll.objects.create(to_model=LARGE, backends=["default"])
    assert schedule_swaps() == []
    Roll.objects.filter(pk=roll.pk).update(status=Operation.Status.SUCCEEDED)
    Operation.objects.create(
        backend=default,
        kind=Operation.Kind.SWITCH,
        source=Operation.Source.REQUEST,
        to_model=SMALL,
        status=Operation.Status.FAILED,
        finished=timezone.now(),
    )
    assert chosen() == []  # not tried again at once: a model that fails to load would be loaded in a loop


def test_a_request_for_an_unknown_or_forbidden_model_is_refused_with_a_sentence() -> None:
    backend("default", TINY)
    with pytest.raises(LoadRefused) as unknown:
        check_request("Nope-7B", is_admin=True)
    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")
    assert "There is no model named Nope-7B" in unknown.value.message
    with pytest.raises(LoadRefused) as forbidden:
        check_request(SMALL, is_admin=False)
    assert (forbidden.value.status, forbidden.value.code) == (403, "model_not_loadable")
    assert "only an admin's request may have it loaded" in forbidden.value.message
    check_request(SMALL, is_admin=True)
    everyone(LARGE)
    ModelSettings.objects.filter(model_name=LARGE).update(values={"load_on_request": "nobody"})
    with pytest.raises(LoadRefused, match="no request may have it loaded"):
        check_request(LARGE, is_admin=True)
    assert loadable_models(is_admin=False) == []
    assert loadable_models(is_admin=True) == [SMALL, TINY]


def test_a_model_asked_for_in_turn_with_another_keeps_its_group_while_idle_between_requests(member: User) -> None:
    """Clients alternating between two models: between two of its answers the loaded model is idle, but
    it answered a request sent after the request for the other model was queued, so it is busy (a swap
    each time it is idle for a moment would load once per request)."""
    everyone(SMALL)
    default = backend("default", TINY, used=0.2)
    held(member, SMALL, waited=2)
    Backend.objects.filter(pk=default.pk).update(asked_at=timezone.now() - timedelta(seconds=1))
    assert chosen() == []  # Tiny was asked for after the request for Small came: its group's turn
    Message.objects.filter(conversation__model_name=SMALL).update(updated=timezone.now() - timedelta(seconds=11))
    assert chosen() == [(SMALL, "default")]  # not past the bound
    Message.objects.filter(conversation__model_name=SMALL).update(updated=timezone.now() - timedelta(seconds=0.5))
    assert chosen() == [(SMALL, "default")]  # its last answer began before this request came: idle


def test_an_ended_answer_notes_when_the_latest_answer_on_its_backend_began(member: User) -> None:
    default = backend("default", TINY)
    question = answering(member, default)
    reply = Message.objects.create(
        conversation=question.conversation, role=Message.Role.ASSISTANT, status=Message.Status.GENERATING
    )
    now = timezone.now()
    finish = async_to_sync(_finish)
    assert finish(question, reply, "Hi", Message.Status.DONE, "", TINY, default, None, now - timedelta(seconds=5))
    assert Backend.objects.get(pk=default.pk).asked_at == now - timedelta(seconds=5)
    finish(question, reply, "Hi", Message.Status.DONE, "", TINY, default, None, now - timedelta(seconds=9))
    assert Backend.objects.get(pk=default.pk).asked_at == now - timedelta(seconds=5)  # an older one ending later
    finish(question, reply, "Hi", Message.Status.DONE, "", TINY, default, None, now - timedelta(seconds=2))
    row = Backend.objects.get(pk=default.pk)
    assert row.asked_at == now - timedelta(seconds=2) and row.used_at is not None and row.used_at >= now
