"""A model's policies: what Gantry itself does with the model, read from its settings (the "policy" group
of settings_fields), and the questions every part that loads or unloads on its own asks first.

- `pinned`: never unloaded by Gantry itself (when idle, or to load another model); an admin still can.
- `idle_unload_after`: seconds without a request on a backend holding it, then Gantry unloads it there.
- `preload`: loaded when Gantry starts, on a backend holding nothing.
- `min_residency`: seconds it stays loaded at least before Gantry may unload it.
- `load_on_request`: who may have it loaded by asking for it ("nobody", "admins", "everyone").

A backend's clocks are `loaded_at` (when the model it holds was loaded, or first seen loaded) and `used_at`
(when an answer on it last ended); its idle time counts from the later of the two. `asked_at` (when the
latest of its ended answers began) tells the swap scheduler its model was asked for while a request for
another model waited. What acts on the policies (idle unloads, preloads) is in
models_admin.policy_actions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Case, DateTimeField, F, Value, When
from django.utils import timezone

from gantry.rows import Rows
from models_admin.model_settings import ModelSettings
from models_admin.models import Backend, Operation
from models_admin.signals import running_answers

ADMINS = "admins"


@dataclass(frozen=True)
class Policy:
    pinned: bool = False
    idle_unload_after: int | None = None  # seconds; None: never unloaded for being idle
    preload: bool = False
    min_residency: int | None = None  # seconds; None: no minimum
    load_on_request: str = ADMINS  # "nobody", "admins" or "everyone"

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Policy:
        """The policy a model's stored settings say (what is unset keeps its default)."""
        return cls(
            pinned=bool(values.get("pinned", False)),
            idle_unload_after=values.get("idle_unload_after"),
            preload=bool(values.get("preload", False)),
            min_residency=values.get("min_residency"),
            load_on_request=values.get("load_on_request") or ADMINS,
        )


ALL_SETTINGS = Rows(ModelSettings)


def policy_for(model: str) -> Policy:
    """The model's policy (the defaults for a model without settings, or for no model)."""
    return Policy.of(ModelSettings.objects.values_of(model)) if model else Policy()


def policies_of(models: Iterable[str]) -> dict[str, Policy]:
    """The policies of several models in one query; a model without settings has the defaults."""
    names = {name for name in models if name}
    # Every page asks (the picker, the Models tab): the few settings rows in one plain statement.
    found = {row.model_name: Policy.of(row.values) for row in ALL_SETTINGS.fetch() if row.model_name in names}
    return {name: found.get(name, Policy()) for name in names}


def preloaded_models() -> list[str]:
    """The models whose `preload` is set, by name."""
    rows = ModelSettings.objects.values_list("model_name", "values")
    return sorted(name for name, values in rows if values.get("preload") is True)


def unloaded_by_policy(backend: Backend) -> bool:
    """Whether the backend's last operation was an idle unload by a model's policy: it still names the
    model it should hold (`desired_model`), which nothing loads again on its own."""
    last = Operation.objects.filter(backend=backend).order_by("-started", "-id").values("kind", "source", "status").first()
    return last == {"kind": Operation.Kind.UNLOAD, "source": Operation.Source.POLICY, "status": Operation.Status.SUCCEEDED}


def answer_ended(backend: Backend, now: datetime, began: datetime) -> None:
    """An answer on `backend` that began at `began` ended `now`: the backend's clocks move on."""
    latest = Case(When(asked_at__gt=began, then=F("asked_at")), default=Value(began, output_field=DateTimeField()))
    Backend.objects.filter(pk=backend.pk).update(used_at=now, asked_at=latest)


def idle_since(backend: Backend) -> datetime | None:
    """Since when the model a backend holds has had no request: its load, or its last answer's end."""
    times = [moment for moment in (backend.loaded_at, backend.used_at) if moment is not None]
    return max(times) if times else None


def residency_left(backend: Backend, now: datetime, policy: Policy) -> float:
    """Seconds before the backend's model has stayed its `min_residency` (0: it has)."""
    if not policy.min_residency or backend.loaded_at is None:
        return 0.0
    return max(0.0, policy.min_residency - (now - backend.loaded_at).total_seconds())


def may_unload(backend: Backend, now: datetime | None = None, policy: Policy | None = None) -> bool:
    """Whether Gantry itself may unload the model a backend holds now (to load another, or for being idle):
    not when it is pinned, nor before it has stayed loaded its `min_residency`. An admin's unload is
    never asked."""
    if not backend.active_model:
        return True
    policy = policy or policy_for(backend.active_model)
    return not policy.pinned and residency_left(backend, now or timezone.now(), policy) == 0


def idle_unload_in(backend: Backend, now: datetime, policy: Policy, running: int | None = None) -> float | None:
    """Seconds until the idle policy unloads the backend's model (0: due now); None when it never will
    (no `idle_unload_after`, pinned, or nothing ready). While answers run on it, the whole idle time: the
    clock starts again when the last one ends."""
    if not backend.is_ready or policy.pinned or not policy.idle_unload_after:
        return None
    running = running_answers(backend.pk) if running is None else running
    since = idle_since(backend)
    if running or since is None:
        left = float(policy.idle_unload_after)
    else:
        left = max(0.0, policy.idle_unload_after - (now - since).total_seconds())
    return max(left, residency_left(backend, now, policy))


def row_fields(model: str, holders: list[Backend], policies: Mapping[str, Policy], now: datetime) -> dict[str, Any]:
    """The policy fields of a model's row in the model list: `pinned`, `preload`, `idle_unload_after`, and
    `idle_unload_in`, the seconds until the first of the backends holding it unloads it for being idle."""
    policy = policies.get(model, Policy())
    times = [left for backend in holders if (left := idle_unload_in(backend, now, policy)) is not None]
    return {
        "pinned": policy.pinned,
        "preload": policy.preload,
        "idle_unload_after": policy.idle_unload_after,
        "idle_unload_in": round(min(times), 1) if times else None,
    }


def idle_due(backend: Backend, now: datetime, policy: Policy) -> bool:
    """Whether the idle policy unloads the backend's model now: ready, no operation on it, no answer
    running on it, unused for `idle_unload_after` seconds, and Gantry may unload it (not pinned, its
    `min_residency` served)."""
    if backend.operation_id is not None or backend.abandoned_load or idle_since(backend) is None:
        return False
    return may_unload(backend, now, policy) and idle_unload_in(backend, now, policy) == 0
