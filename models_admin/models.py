from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

# Defined apart (their own concern), registered as this app's models by being imported here.
from models_admin.model_settings import ModelSettings, SettingsChange  # noqa: F401

DEFAULT_BACKEND = "default"


class Backend(models.Model):
    """A TabbyAPI server and what Gantry knows of it: the fleet's members.

    `default` is the server of TABBY_HOST, whose keys come from the settings (or TabbyAPI's tokens file);
    the others are added by admins with their own keys, stored here and never shown again.
    """

    class State(models.TextChoices):
        READY = "ready"
        SWITCHING = "switching"
        UNLOADING = "unloading"
        UNLOADED = "unloaded"
        FAILED = "failed"
        UNREACHABLE = "unreachable"  # TabbyAPI did not answer the last check (nothing is known to be loaded)
        # How the Backends API shows a backend (never stored): out of rotation, or not answering.
        DRAINING = "draining"
        DOWN = "down"

    class Trouble(models.TextChoices):
        """What went wrong the last time Gantry asked TabbyAPI (none: the last answer was fine)."""

        NONE = ""
        UNREACHABLE = "unreachable"
        KEY = "key"  # TabbyAPI refused Gantry's key, or the admin key has no admin rights
        ANSWER = "answer"  # TabbyAPI answered something Gantry cannot use

    name = models.CharField(max_length=100, unique=True, default="default")
    base_url = models.CharField(max_length=500)
    # The keys of an added backend (write-only: never shown or returned); `default` takes its keys from the settings.
    api_key = models.CharField(max_length=500, blank=True, default="")
    admin_key = models.CharField(max_length=500, blank=True, default="")
    # The model this backend should hold (the fleet's desired state): loaded again when it comes back.
    desired_model = models.CharField(max_length=200, blank=True, default="")
    # Out of rotation (draining): no new answer goes to it; those running finish.
    in_rotation = models.BooleanField(default=True)
    # When an answer was last sent to it: among equally busy backends, the one that waited longest goes first.
    routed_at = models.DateTimeField(null=True, blank=True)
    # The model policies' clocks (models_admin.policies): when the model it holds was loaded (or first seen
    # loaded), and when an answer on it last ended. Idle time counts from the later of the two.
    loaded_at = models.DateTimeField(null=True, blank=True)
    used_at = models.DateTimeField(null=True, blank=True)
    # When the latest answer that ended on it had begun (its request was sent): the swap scheduler's sign
    # that its model was asked for while a request for another model waited (models_admin.swap_scheduler).
    asked_at = models.DateTimeField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.UNLOADED)
    active_model = models.CharField(max_length=200, blank=True, default="")
    target_model = models.CharField(max_length=200, blank=True, default="")
    operation = models.ForeignKey("Operation", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    refreshed_at = models.DateTimeField(null=True, blank=True)
    # The last failure to read TabbyAPI, as a sentence for admins naming what to fix; "" after a good answer.
    trouble = models.CharField(max_length=16, choices=Trouble.choices, blank=True, default="")
    trouble_text = models.TextField(blank=True, default="")
    # The watchers' light checks: when one was last made (one process claims each), and until when the
    # state is in doubt (checked every second meanwhile).
    checked_at = models.DateTimeField(null=True, blank=True)
    doubt_until = models.DateTimeField(null=True, blank=True)
    # A load TabbyAPI still runs after a switch stopped waiting for it (TabbyAPI does not stop a load whose
    # client gave up, and loads nothing else meanwhile); the process following it beats `abandoned_beat`.
    abandoned_load = models.CharField(max_length=200, blank=True, default="")
    abandoned_since = models.DateTimeField(null=True, blank=True)
    abandoned_beat = models.DateTimeField(null=True, blank=True)
    updated = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.name

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_BACKEND

    @property
    def fleet_state(self) -> str:
        """The state as the Backends API and tab show it: `down` for a server that does not answer,
        `draining` for one out of rotation, else the state."""
        if self.state == self.State.UNREACHABLE:
            return self.State.DOWN
        if not self.in_rotation and not self.is_busy:
            return self.State.DRAINING
        return self.state

    @property
    def is_ready(self) -> bool:
        return self.state == self.State.READY and bool(self.active_model)

    @property
    def is_busy(self) -> bool:
        return self.state in (self.State.SWITCHING, self.State.UNLOADING)

    @property
    def is_in_doubt(self) -> bool:
        """Whether the watchers check TabbyAPI every second: its state is not known for sure."""
        return (
            self.state in (self.State.UNREACHABLE, self.State.FAILED)
            or bool(self.abandoned_load)
            or (self.doubt_until is not None and self.doubt_until > timezone.now())
        )

    def as_row(self, running: int) -> dict[str, Any]:
        """The backend as the Backends API and tab show it (never its keys), with its `running` answers."""
        last_loads = (
            Operation.objects.filter(backend=self, status=Operation.Status.SUCCEEDED, load_seconds__isnull=False)
            .order_by("-finished")
            .values("to_model", "load_seconds", "finished")[:5]
        )
        return {
            "name": self.name,
            "url": settings.TABBY_HOST if self.is_default else self.base_url,
            "state": self.fleet_state,
            "active_model": self.active_model or None,
            "desired_model": self.desired_model or None,
            "target_model": self.target_model or None,
            "in_rotation": self.in_rotation,
            "running": running,
            "healthy": self.state != self.State.UNREACHABLE and self.trouble != self.Trouble.UNREACHABLE,
            "trouble": self.trouble or None,
            "trouble_text": self.trouble_text or None,
            "operation_id": self.operation_id,
            "checked_at": self.checked_at.isoformat() if self.checked_at else None,
            "last_loads": [
                {"model": row["to_model"], "seconds": row["load_seconds"], "finished": row["finished"].isoformat() if row["finished"] else None}
                for row in last_loads
            ],
            "models": list(self.language_models.filter(present=True).order_by("name").values_list("name", flat=True)),
            "default": self.is_default,
        }

    def as_event(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "active_model": self.active_model or None,
            "target_model": self.target_model or None,
            "trouble": self.trouble or None,
            "trouble_text": self.trouble_text or None,
            "abandoned_load": self.abandoned_load or None,
        }


class LanguageModel(models.Model):
    """A model folder seen on a backend."""

    backend = models.ForeignKey(Backend, on_delete=models.CASCADE, related_name="language_models")
    name = models.CharField(max_length=200)
    present = models.BooleanField(default=True)
    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["backend", "name"], name="unique_model_per_backend")]

    def __str__(self) -> str:
        return self.name


class OperationQuerySet(models.QuerySet):
    def running(self) -> OperationQuerySet:
        return self.filter(status=Operation.Status.RUNNING)

    def stale(self, seconds: float) -> OperationQuerySet:
        """Running operations whose worker has given no sign of life for `seconds`."""
        return self.running().filter(heartbeat__lt=timezone.now() - timedelta(seconds=seconds))

    def successful_loads(self, model_name: Any) -> OperationQuerySet:
        """The model's successful loads with their duration, newest first (`model_name` may be an OuterRef)."""
        return self.filter(to_model=model_name, status=Operation.Status.SUCCEEDED, load_seconds__isnull=False).order_by("-finished")

    def load_seconds(self, model_name: str, limit: int = 5) -> list[float]:
        """How long the last successful loads of a model took (for the time-left estimate)."""
        return [float(v) for v in self.successful_loads(model_name).values_list("load_seconds", flat=True)[:limit]]


class Operation(models.Model):
    """One switch or unload: the audit log, and the state a running one reports."""

    class Kind(models.TextChoices):
        SWITCH = "switch"
        UNLOAD = "unload"

    class Status(models.TextChoices):
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    class Source(models.TextChoices):
        DASHBOARD = "dashboard"
        API = "api"
        COMMAND = "command"
        FLEET = "fleet"  # Gantry itself: a backend that came back gets its desired model again
        POLICY = "policy"  # Gantry itself, by a model's policy: an idle model unloaded, a preloaded one loaded
        REQUEST = "request"  # Gantry itself, for held requests naming a model no backend held (the swap scheduler)

    backend = models.ForeignKey(Backend, on_delete=models.CASCADE, related_name="operations")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.API)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    from_model = models.CharField(max_length=200, blank=True, default="")
    to_model = models.CharField(max_length=200, blank=True, default="")
    step = models.CharField(max_length=32, blank=True, default="queued")
    percent = models.FloatField(default=0)
    text = models.CharField(max_length=300, blank=True, default="")
    error = models.TextField(blank=True, default="")
    # "stalled" (no progress within GANTRY_SWITCH_TIMEOUT), "unreachable", "load_failed", "interrupted"...
    error_kind = models.CharField(max_length=32, blank=True, default="")
    rolled_back = models.BooleanField(default=False)
    # The fleet switch this backend's switch is a step of (None: a switch of its own).
    roll = models.ForeignKey("Roll", null=True, blank=True, on_delete=models.SET_NULL, related_name="operations")
    load_seconds = models.FloatField(null=True, blank=True)
    started = models.DateTimeField(auto_now_add=True)
    heartbeat = models.DateTimeField(default=timezone.now)
    finished = models.DateTimeField(null=True, blank=True)

    objects = OperationQuerySet.as_manager()

    class Meta:
        ordering = ["-started", "-id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.from_model or '-'} → {self.to_model or '-'} ({self.status})"

    def roll_share(self, percent: float, text: str) -> tuple[float, str]:
        """A rolling fleet switch's step's progress as the whole roll's: its percent of the roll, and its
        text naming the backend (a step of its own, or of an `all` roll, is unchanged)."""
        roll = self.roll
        if roll is None or roll.strategy != Roll.Strategy.ROLLING or self.backend.name not in roll.backends:
            return percent, text
        index, count = roll.backends.index(self.backend.name), len(roll.backends)
        return round((index * 100 + percent) / count, 1), f"{self.backend.name} ({index + 1} of {count}): {text}"

    @property
    def duration(self) -> float | None:
        return (self.finished - self.started).total_seconds() if self.finished else None


class Roll(models.Model):
    """A fleet switch: the backends serving the old default model move to the new one, one at a time
    (`rolling`: the others keep answering) or all at once (`all`). Each backend's switch is an Operation
    of its own (`operations`); the roll is picked up from here by any process when its runner dies."""

    class Strategy(models.TextChoices):
        ROLLING = "rolling"
        ALL = "all"

    strategy = models.CharField(max_length=16, choices=Strategy.choices, default=Strategy.ROLLING)
    status = models.CharField(max_length=16, choices=Operation.Status.choices, default=Operation.Status.RUNNING)
    source = models.CharField(max_length=16, choices=Operation.Source.choices, default=Operation.Source.API)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    from_model = models.CharField(max_length=200, blank=True, default="")
    to_model = models.CharField(max_length=200)
    # The names of the backends to move, in order (the default first: its success is the cutover).
    backends = models.JSONField(default=list)
    error = models.TextField(blank=True, default="")
    started = models.DateTimeField(auto_now_add=True)
    heartbeat = models.DateTimeField(default=timezone.now)
    finished = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started", "-id"]

    def __str__(self) -> str:
        return f"roll {self.from_model or '-'} → {self.to_model} ({self.status})"
