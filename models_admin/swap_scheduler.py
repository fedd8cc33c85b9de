"""Swap on request: a held request naming a model that no backend holds or is loading has it loaded on a
backend, when the model's `load_on_request` lets its sender's role (models_admin.policies).

Which backend: an idle one first (holding nothing, or holding a model with no answer running and no
request waiting for it), the empty ones before those holding a model; else the least recently used
(`used_at`, `loaded_at`) among the others. Never a backend whose model is pinned or has not stayed its
`min_residency` (policies.may_unload), nor one out of rotation, away, in trouble or running an operation;
nothing at all while a fleet switch (Roll) runs. In a fleet, the default backend comes last among equals:
the model it holds is the fleet's default, which chat follows.

Grouping: a model still busy (answers running or requests waiting for it, or it answered a request sent
after the oldest request for the other model was queued: clients asking for both in turn) keeps its
backend while it serves them, but a request for another model waits no longer than GANTRY_MAX_SWAP_WAIT
for that: once the oldest request for it has waited that long since it was queued, the busy backend is
swapped anyway; its running answers finish first, as a switch drains them, and the requests still
waiting for its model wait for it in turn (their own clock runs from when they were queued, so the model
swapped away comes back).
A model just loaded keeps its backend until the requests queued before its load are released (the
moment it is ready): a swap in between would leave them for another round of loads.
A request so waits at most GANTRY_MAX_SWAP_WAIT (or the load under way, if longer), the drain and its
own model's load.

A request for a model that only pinned models stand in the way of waits (and gets GANTRY_HOLD_TIMEOUT's
503 in the end): a pin is an admin's word, and an admin may unpin or switch.

Each swap is a switch like an admin's (models_admin.operations.request_switch), audited with the source
`request` and the user whose request waited longest; the switch makes the model the backend's desired
model, so the fleet's reconciler keeps it there. Every web process's watcher (and Celery's `watch_fleet`)
runs a round every second; one process at a time decides, under the claim lock (the default backend's row).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from gantry.rows import Rows
from models_admin import operations
from models_admin.fleet import backends
from models_admin.models import Backend, LanguageModel, Operation, Roll
from models_admin.policies import ADMINS, Policy, idle_since, may_unload, policies_of, policy_for
from models_admin.services import default_backend
from models_admin.signals import Held, held_messages, running_answers
from models_admin.tabby_errors import BackendError

log = logging.getLogger(__name__)
EVERYONE, NOBODY = "everyone", "nobody"
# A model whose load on request just failed is not tried again on request for this long.
RETRY_AFTER = timedelta(seconds=30)
REFUSED = (operations.UnknownModel, operations.OperationConflict, operations.StillLoading, BackendError)
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)
PRESENT_MODELS = Rows(LanguageModel, "present")  # every chat page's picker asks: built once (gantry.rows)


class LoadRefused(Exception):
    """A request names a model it cannot have: none has it (404), or its policy does not let the caller's
    role load it (403). `message` says so, and what to do."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def may_load(policy: Policy, is_admin: bool) -> bool:
    """Whether a request of someone of this role may have the model loaded (its `load_on_request`)."""
    return policy.load_on_request == EVERYONE or (policy.load_on_request == ADMINS and is_admin)


def being_loaded(model: str) -> bool:
    """Whether a backend is loading the model now (a switch, or a load TabbyAPI still runs)."""
    loading = Backend.objects.filter(state=Backend.State.SWITCHING, target_model=model)
    return loading.exists() or Backend.objects.filter(abandoned_load=model).exists()


def check_request(model: str, is_admin: bool) -> None:
    """For a request naming a model that no backend serves now: fine when a backend is loading it, or
    when one has it and its policy lets the caller load it (the scheduler then does); else LoadRefused."""
    if not LanguageModel.objects.filter(name=model, present=True).exists():
        raise LoadRefused(
            f"There is no model named {model[:200]} on any model server. GET /v1/models lists the models you may name.",
            404,
            "model_not_found",
        )
    if being_loaded(model):
        return
    policy = policy_for(model)
    if may_load(policy, is_admin):
        return
    who = "no request may have it loaded" if policy.load_on_request == NOBODY else "only an admin's request may have it loaded"
    raise LoadRefused(
        f"The model {model} is not loaded, and {who} (its load_on_request policy is {policy.load_on_request}). "
        "Ask an admin to load it, or name a model that is served now (GET /v1/models lists them).",
        403,
        "model_not_loadable",
    )


def loadable_models(is_admin: bool) -> list[str]:
    """The models some backend has that someone of this role may have loaded by asking for them, served now
    or not (the chat page's picker offers those not served after the served ones)."""
    present = {model.name for model in PRESENT_MODELS.fetch()}
    policies = policies_of(present)
    return sorted(name for name in present if may_load(policies[name], is_admin))


@dataclass(frozen=True)
class Demand:
    """The requests held for a model: the oldest whose sender may have it loaded (whose user the swap is
    audited under), and since when it waits."""

    model: str
    since: datetime
    user_id: int


@dataclass(frozen=True)
class Swap:
    model: str
    backend: Backend
    user_id: int
    why: str


def demands(held: list[Held], policies: dict[str, Policy]) -> list[Demand]:
    """Per model named by held requests and loadable by one of their senders, the oldest such request."""
    found: dict[str, Demand] = {}
    for row in held:  # oldest first
        if row.named and row.model not in found and may_load(policies[row.model], row.is_admin):
            found[row.model] = Demand(row.model, row.since, row.user_id)
    return list(found.values())


def _held_or_loading(fleet: list[Backend]) -> set[str]:
    models = {b.active_model for b in fleet if b.is_ready} | {b.target_model for b in fleet if b.is_busy}
    return (models | {b.abandoned_load for b in fleet}) - {""}


def _failed_lately(models: set[str], now: datetime) -> set[str]:
    failed = Operation.objects.filter(
        source=Operation.Source.REQUEST, status=Operation.Status.FAILED, to_model__in=models, finished__gt=now - RETRY_AFTER
    )
    return set(failed.values_list("to_model", flat=True))


def plan(fleet: list[Backend], held: list[Held], now: datetime) -> list[Swap]:
    """The swaps to begin now for the held requests `held` (oldest first), on the backends `fleet`."""
    missing = {row.model for row in held if row.named} - _held_or_loading(fleet)
    if not missing:
        return []
    policies = policies_of(missing | {b.active_model for b in fleet})
    wanted = [d for d in demands(held, policies) if d.model in missing]
    retry_later = _failed_lately({d.model for d in wanted}, now)
    folders = set(LanguageModel.objects.filter(present=True, name__in=missing).values_list("backend_id", "name"))
    waiting: dict[str, datetime] = {}
    for row in held:  # oldest first: each model's oldest waiting request
        waiting.setdefault(row.model, row.since)
    swaps: list[Swap] = []
    for demand in wanted:
        if demand.model in retry_later:
            continue
        taken = {swap.backend.pk for swap in swaps}
        candidates = [b for b in fleet if b.pk not in taken and (b.pk, demand.model) in folders and _swappable(b, now, policies)]
        chosen = choose(candidates, demand, now, waiting)
        if chosen is not None:
            swaps.append(Swap(demand.model, chosen[0], demand.user_id, chosen[1]))
    return swaps


def _swappable(backend: Backend, now: datetime, policies: dict[str, Policy]) -> bool:
    """A backend the scheduler may give another model: in rotation, answering, no operation or load of
    TabbyAPI's own running on it, and its model (if any) neither pinned nor short of its min_residency."""
    if not backend.in_rotation or backend.operation_id is not None or backend.abandoned_load or backend.trouble:
        return False
    if backend.state not in (Backend.State.READY, Backend.State.UNLOADED):
        return False
    return not backend.active_model or may_unload(backend, now, policies.get(backend.active_model, Policy()))


def _idle_since_asked(backend: Backend, demand: Demand, waiting: dict[str, datetime]) -> bool:
    """A ready backend whose model has no answer running and no request waiting, and has not answered a
    request sent after the one waiting for `demand`'s model was queued: a model asked for in turn with
    another (clients alternating between two) is busy, and keeps its backend for its group."""
    if backend.active_model in waiting or running_answers(backend.pk):
        return False
    return backend.asked_at is None or backend.asked_at <= demand.since


def choose(candidates: list[Backend], demand: Demand, now: datetime, waiting: dict[str, datetime]) -> tuple[Backend, str] | None:
    """The backend to swap for `demand` and why: an idle one first, else the least recently used busy one
    once the request has waited GANTRY_MAX_SWAP_WAIT for its model's group; None: wait. `waiting`: since
    when the oldest request for each model waits. A busy backend whose model still has requests queued
    before its load (those it was loaded for, released in the moments after it is ready) keeps it."""

    def order(backend: Backend) -> tuple[bool, bool, datetime]:
        return backend.is_ready, backend.is_default, idle_since(backend) or LONG_AGO

    idle = [b for b in candidates if not b.is_ready or _idle_since_asked(b, demand, waiting)]
    if idle:
        chosen = min(idle, key=order)
        return chosen, "it was idle" if chosen.is_ready else "it held nothing"
    bound = timedelta(seconds=settings.GANTRY_MAX_SWAP_WAIT)
    served = [b for b in candidates if b.loaded_at is None or waiting.get(b.active_model, now) >= b.loaded_at]
    if not served or now - demand.since < bound:
        return None
    chosen = min(served, key=order)
    return chosen, f"a request waited {settings.GANTRY_MAX_SWAP_WAIT:g} s while {chosen.active_model} served its own"


def schedule_swaps(now: datetime | None = None) -> list[Operation]:
    """One round: begin the swaps the held requests call for; returns the switches begun. Decided under
    the claim lock, so two processes never swap two backends for one model."""
    held = held_messages()
    if not any(row.named for row in held) or not plan(backends(), held, now or timezone.now()):
        return []  # the common case, without the lock: nothing waits for a model nobody holds
    begun = []
    with transaction.atomic():
        default_backend(locked=True)
        if Roll.objects.filter(status=Operation.Status.RUNNING).exists():
            return []  # a fleet switch moves the backends; the requests wait for it
        for swap in plan(backends(), held_messages(), now or timezone.now()):
            operation = _begin(swap)
            if operation is not None:
                begun.append(operation)
    return begun


def _begin(swap: Swap) -> Operation | None:
    user = get_user_model().objects.filter(pk=swap.user_id).first()
    try:
        operation = operations.request_switch(swap.model, user, Operation.Source.REQUEST, swap.backend)
    except REFUSED as exc:
        log.warning("Loading %s on the backend %s for held requests was refused: %s", swap.model, swap.backend.name, exc)
        return None
    if operation is not None:
        held = swap.backend.active_model or "nothing"
        log.info("Loading %s on the backend %s (holding %s) for held requests: %s", swap.model, swap.backend.name, held, swap.why)
    return operation
