"""Running a recorded switch or unload to its end (the body of the Celery task), and recovering runs
whose process died.

The run drains running answers, unloads (0-40 %), loads with progress (40-100 %), verifies with
`GET /v1/model`, and on failure reloads the previous model. Every step is saved (the truth survives any
process) and broadcast; the operation's saves are also its heartbeat.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from gantry.broadcast import CHAT_GROUP, MODELS_GROUP, ModelProgressEvent, broadcast
from models_admin.clients import admin_client
from models_admin.models import Backend, ModelSettings, Operation
from models_admin.services import announce_state, end_abandoned_load, sync_models
from models_admin.signals import model_ready, running_answers
from models_admin.tabby_client import TabbyClient
from models_admin.tabby_errors import BackendAuthError, BackendError, BackendUnavailable, NoModelLoaded

log = logging.getLogger(__name__)
T = TypeVar("T")


class Stalled(Exception):
    """A load made no progress for GANTRY_SWITCH_TIMEOUT seconds.

    TabbyAPI goes on with it: it does not stop a load whose client gave up, and loads nothing else until
    it ends. `follow(beat)` gives the load's events still to come, however long they take; `model` is
    the model being loaded.
    """

    def __init__(self, message: str, follow: Callable[[Callable[[], None]], Iterator[Any]]) -> None:
        super().__init__(message)
        self.follow = follow
        self.model = ""


# Chat pages show a banner, not the bar: they get a progress event at most this often (and every step).
CHAT_PROGRESS_EVERY = 0.5  # seconds
# The operation's row (its progress and heartbeat) is saved at most this often within a step.
SAVE_PROGRESS_EVERY = 0.25  # seconds


@dataclass
class Reporter:
    """Saves and broadcasts an operation's progress; its saves are also the heartbeat.

    Every event goes to the Models pages (the bar moves module by module); chat pages and the database
    get the latest one at a bounded rate, so a model of many modules costs the web process little.
    """

    operation: Operation
    load_started: float = 0.0
    loading: str = ""  # the model being loaded (the target, or the previous one when rolling back)
    _past_loads: list[float] | None = None
    _last_step: str = ""
    _last_saved: float = 0.0
    _last_to_chat: float = 0.0

    def report(self, step: str, percent: float, text: str, module: int = 0, modules: int = 0) -> None:
        op = self.operation
        new_step, now = step != self._last_step, time.monotonic()
        op.step, op.percent, op.text, op.heartbeat = step, round(percent, 1), text, timezone.now()
        if new_step or now - self._last_saved >= SAVE_PROGRESS_EVERY or percent >= 100:
            op.save(update_fields=["step", "percent", "text", "heartbeat"])
            self._last_saved = now
        shown, text = op.roll_share(op.percent, text)  # a fleet switch's step: the bar is the whole switch's
        event = ModelProgressEvent(
            type="model.progress",
            operation_id=op.pk,
            step=step,
            model=op.to_model or op.from_model or None,
            percent=shown,
            module=module,
            modules=modules,
            text=text,
            eta_seconds=self.eta(module, modules),
        )
        if not op.backend.is_default and op.source != Operation.Source.REQUEST:
            # Another backend's steps are saved (the audit log); the Models pages show a fleet switch's. A
            # load for held requests goes to chat too: its requests and pages show its progress.
            if op.roll_id is not None:
                broadcast(MODELS_GROUP, event)
            self._last_step = step
            return
        broadcast(MODELS_GROUP, event)
        if new_step or now - self._last_to_chat >= CHAT_PROGRESS_EVERY:
            broadcast(CHAT_GROUP, event)
            self._last_to_chat = now
        self._last_step = step

    def start_load(self, model: str) -> None:
        self.load_started, self.loading, self._past_loads = time.monotonic(), model, None

    def beat(self) -> None:
        Operation.objects.filter(pk=self.operation.pk).update(heartbeat=timezone.now())

    def eta(self, module: int, modules: int) -> float | None:
        """Time left for a load: from this model's past load durations, else from the pace so far."""
        if self.operation.step not in ("loading", "rolling_back") or not self.load_started:
            return None
        elapsed = time.monotonic() - self.load_started
        if self._past_loads is None:
            self._past_loads = Operation.objects.load_seconds(self.loading)
        if self._past_loads:
            return round(max(0.0, statistics.median(self._past_loads) - elapsed), 1)
        if module and modules:
            return round(elapsed * (modules - module) / module, 1)
        return None


def watched(events: Iterator[T], timeout: float, beat: Callable[[], None]) -> Iterator[T]:
    """Yield `events`, failing with Stalled when none comes for `timeout` seconds (pings don't count)."""
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()

    def pump() -> None:
        try:
            for event in events:
                inbox.put(("event", event))
            inbox.put(("end", None))
        except BaseException as exc:  # handed to the waiting thread
            inbox.put(("error", exc))

    threading.Thread(target=pump, name="load-events", daemon=True).start()
    last = time.monotonic()
    while True:
        left = timeout - (time.monotonic() - last)
        if left <= 0:
            seconds = f"{timeout:.0f} second{'' if round(timeout) == 1 else 's'}"
            raise Stalled(f"The model server made no progress for {seconds}.", lambda beat: _drained(inbox, beat))
        ended, value = _take(inbox, min(1.0, left), beat)
        if ended:
            return
        if value is not _SILENCE:
            last = time.monotonic()
            yield value


def _drained(inbox: queue.Queue[tuple[str, Any]], beat: Callable[[], None]) -> Iterator[Any]:
    """The events still to come from a load's pump, to its end, with `beat` every second meanwhile."""
    while True:
        ended, value = _take(inbox, 1.0, beat)
        if ended:
            return
        if value is not _SILENCE:
            yield value


_SILENCE = object()  # what `_take` gives when nothing came


def _take(inbox: queue.Queue[tuple[str, Any]], wait: float, beat: Callable[[], None]) -> tuple[bool, Any]:
    """The pump's next event as (False, event); (True, None) at its end; (False, _SILENCE) when nothing came
    for `wait` seconds (after a `beat`). The pump's error is raised here."""
    try:
        kind, value = inbox.get(timeout=wait)
    except queue.Empty:
        beat()
        return False, _SILENCE
    if kind == "error":
        raise value
    return kind == "end", value


def run_operation(operation_id: int) -> None:
    """The body of the Celery task: run a recorded switch or unload to its end."""
    operation = Operation.objects.select_related("backend", "roll").get(pk=operation_id)
    if operation.status != Operation.Status.RUNNING:
        return
    reporter = Reporter(operation)
    # One client to the end: a stalled load's stream stays open on it while the load is followed.
    with admin_client(backend=operation.backend) as client:
        try:
            _drain(reporter)
            _unload(client, reporter)
            if operation.kind == Operation.Kind.SWITCH:
                _load(client, reporter, operation.to_model, "loading", "Step 2: Loading {model}...")
                _verify(client, operation.to_model)
        except (Stalled, BackendError) as exc:
            _fail(reporter, exc, client)
        else:
            _succeed(reporter)


@contextmanager
def beating(reporter: Reporter) -> Iterator[None]:
    """Keep the operation's heartbeat going while a blocking call runs (an unload may drain for long)."""
    done = threading.Event()

    def beat() -> None:
        try:
            while not done.wait(1.0):
                reporter.beat()
        finally:
            connection.close()  # this thread's own database connection

    thread = threading.Thread(target=beat, name="operation-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _drain(reporter: Reporter) -> None:
    """Let answers running on the old model finish, up to GANTRY_DRAIN_TIMEOUT."""
    deadline = time.monotonic() + settings.GANTRY_DRAIN_TIMEOUT
    while (count := running_answers(reporter.operation.backend_id)) and time.monotonic() < deadline:
        reporter.report("draining", 0, f"Waiting for {count} answer{'s' if count != 1 else ''} to finish...")
        time.sleep(0.25)


def _unload(client: TabbyClient, reporter: Reporter) -> None:
    reporter.report("unloading", 5, "Step 1: Unloading current model...")
    try:
        with beating(reporter):
            client.unload()
    except NoModelLoaded:
        pass  # nothing was loaded: the step is done
    Backend.objects.filter(pk=reporter.operation.backend_id).update(active_model="")
    text = "Step 1: Unloading current model..." if reporter.operation.kind == Operation.Kind.SWITCH else "✓ Model unloaded"
    reporter.report("unloading", 40 if reporter.operation.kind == Operation.Kind.SWITCH else 100, text)


def _load(client: TabbyClient, reporter: Reporter, model: str, step: str, template: str) -> None:
    text = template.format(model=model)
    reporter.start_load(model)
    reporter.report(step, 40, text)
    # The model's load parameters go with every load of it: a switch's, and a rollback's.
    load = client.load(model, **ModelSettings.objects.load_request(model))
    try:
        for event in watched(load, settings.GANTRY_SWITCH_TIMEOUT, reporter.beat):
            if event["model_type"] == "model":
                reporter.report(step, 40 + 60 * event["module"] / max(event["modules"], 1), text, event["module"], event["modules"])
    except Stalled as exc:
        exc.model = model
        raise
    reporter.operation.load_seconds = round(time.monotonic() - reporter.load_started, 3)


def _verify(client: TabbyClient, model: str) -> None:
    card = client.current_model()
    if card is None or card.get("id") != model:
        loaded = card.get("id") if card else "nothing"
        raise BackendError(f"After the load, TabbyAPI reports {loaded} loaded instead of {model}.")


def _succeed(reporter: Reporter) -> None:
    op = reporter.operation
    switched = op.kind == Operation.Kind.SWITCH
    _finish(op, Operation.Status.SUCCEEDED, active=op.to_model if switched else "")
    if switched:  # held messages first: their answers wait on nothing but the model
        model_ready.send(sender=Backend, backend_id=op.backend_id, model=op.to_model)
    reporter.report("done", 100, "✓ Model switched successfully!" if switched else "✓ Model unloaded")


def _fail(reporter: Reporter, exc: Exception, client: TabbyClient) -> None:
    op = reporter.operation
    op.error = getattr(exc, "message", None) or str(exc)
    op.error_kind = (
        "stalled"
        if isinstance(exc, Stalled)
        else "unreachable" if isinstance(exc, BackendUnavailable) else "key" if isinstance(exc, BackendAuthError) else "failed"
    )
    op.save(update_fields=["error", "error_kind"])
    log.warning("%s failed: %s", op, op.error)
    reporter.report("failed", op.percent, f"✗ {op.error}")
    # After a stall TabbyAPI goes on loading, and would load the previous model only after that load:
    # a rollback would wait behind it, then undo it. The load is followed to its end instead.
    stalled = exc if isinstance(exc, Stalled) else None
    restored = ""
    if stalled is None:
        try:
            restored = _roll_back(reporter, client)
        except Stalled as again:
            stalled = again
    _finish(op, Operation.Status.FAILED, active=restored, abandoned=stalled.model if stalled else "")
    if restored:
        model_ready.send(sender=Backend, backend_id=op.backend_id, model=restored)
    if stalled is not None:
        _follow(stalled, op.backend_id)


def _roll_back(reporter: Reporter, client: TabbyClient) -> str:
    """Load the previous model again; return its name, or "" when that was not possible (Stalled: the
    rollback's own load stalled)."""
    op = reporter.operation
    previous = op.from_model
    if not (settings.GANTRY_ROLLBACK_ON_FAILURE and previous and op.kind == Operation.Kind.SWITCH and previous != op.to_model):
        return ""
    try:
        _load(client, reporter, previous, "rolling_back", "Loading the previous model, {model}, again...")
        _verify(client, previous)
    except BackendError as exc:
        log.warning("Rolling back to %s failed: %s", previous, exc)
        return ""
    op.rolled_back = True
    op.save(update_fields=["rolled_back"])
    return previous


def _follow(stalled: Stalled, backend_id: int) -> None:
    """Read the stalled load's stream to its end (the Models tab says TabbyAPI still loads, and switches
    are refused meanwhile), then take the state from TabbyAPI."""

    def beat() -> None:
        Backend.objects.filter(pk=backend_id, abandoned_load=stalled.model).update(abandoned_beat=timezone.now())

    try:
        for _ in stalled.follow(beat):
            pass
    except BackendError as exc:
        log.warning("TabbyAPI's load of %s, which a switch stopped waiting for, ended: %s", stalled.model, exc.message)
    else:
        log.info("TabbyAPI's load of %s, which a switch stopped waiting for, has finished", stalled.model)
    end_abandoned_load(stalled.model, Backend.objects.get(pk=backend_id))


def _finish(op: Operation, status: str, active: str, abandoned: str = "") -> None:
    """End the operation and set the backend's state from how it ended. `abandoned`: a model TabbyAPI
    still loads after the operation stopped waiting for it."""
    now = timezone.now()
    unreachable = status == Operation.Status.FAILED and op.error_kind == "unreachable" and not active
    # TabbyAPI's refusal of Gantry's key or its absence is the trouble the Models tab shows, as a check's.
    trouble = {"unreachable": Backend.Trouble.UNREACHABLE, "key": Backend.Trouble.KEY}.get(op.error_kind, Backend.Trouble.NONE)
    if trouble == Backend.Trouble.UNREACHABLE and active:
        trouble = Backend.Trouble.NONE  # the rollback reached it
    with transaction.atomic():
        backend = Backend.objects.select_for_update().get(pk=op.backend_id)
        op.status, op.finished = status, now
        op.save(update_fields=["status", "finished", "load_seconds", "heartbeat"])
        backend.active_model = active
        if active:
            backend.loaded_at = now  # the policies' clock (models_admin.policies) starts with the load
        # What it should hold from now on (nothing, after an unload). An idle unload by the model's policy
        # keeps it: chat still follows that model (answered by the other backends holding it), and the
        # reconciler leaves the backend empty (models_admin.policies.unloaded_by_policy).
        idle_unload = op.kind == Operation.Kind.UNLOAD and op.source == Operation.Source.POLICY
        if status == Operation.Status.SUCCEEDED and not idle_unload:
            backend.desired_model = active
        backend.target_model = ""
        backend.operation = None
        backend.state = Backend.State.READY if active else Backend.State.UNREACHABLE if unreachable else Backend.State.UNLOADED
        backend.trouble = trouble if status == Operation.Status.FAILED else Backend.Trouble.NONE
        backend.trouble_text = op.error if backend.trouble else ""
        backend.abandoned_load = abandoned
        backend.abandoned_since = backend.abandoned_beat = now if abandoned else None
        backend.checked_at = now
        # What Gantry did itself is certain; the watchers check while it is not (unreachable, a load left running).
        backend.doubt_until = None
        backend.save(
            update_fields=[
                "state", "active_model", "loaded_at", "desired_model", "target_model", "operation", "trouble", "trouble_text",
                "abandoned_load", "abandoned_since", "abandoned_beat", "checked_at", "doubt_until", "updated",
            ]
        )
    announce_state(backend)


# Recovery


def reconcile_stale_operations() -> int:
    """Fail operations whose worker died, and take the state from TabbyAPI. Returns how many."""
    stale = list(Operation.objects.stale(settings.GANTRY_OPERATION_STALE_AFTER))
    for op in stale:
        with transaction.atomic():
            claimed = Operation.objects.filter(pk=op.pk, status=Operation.Status.RUNNING).update(
                status=Operation.Status.FAILED,
                finished=timezone.now(),
                error_kind="interrupted",
                error="The operation was interrupted: the process running it stopped.",
            )
            if claimed:
                Backend.objects.filter(pk=op.backend_id, operation=op).update(
                    state=Backend.State.FAILED, operation=None, target_model=""
                )
    for backend_id in {op.backend_id for op in stale}:
        sync_models(backend=Backend.objects.get(pk=backend_id))
    return len(stale)
