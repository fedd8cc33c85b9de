"""The watcher: every web process checks TabbyAPI's state every second while something waits, someone
looks or the state is in doubt, and leaves it to the periodic refresh (GANTRY_REFRESH_INTERVAL) otherwise.

Something waits: held messages (counted by the apps that hold them, through signals.count_waiting).
Someone looks: a page (chat or Admin Dashboard) has its socket open to this process, and its banner must
say within seconds that the model server went away or came back, though nobody has sent anything. In
doubt (Backend.is_in_doubt): TabbyAPI unreachable, an operation that was interrupted, a load a switch
stopped waiting for, or a while after a change Gantry cannot explain (nothing loaded, which is also how a
load in progress looks; a process that just started; the server back after being unreachable).

The check is light: one `GET /v1/model` with a short timeout (TABBY_CHECK_TIMEOUT), a whole sync only when
its answer differs from the record. Several web processes share the work through the database: one
claims each second's check (a conditional UPDATE of `checked_at`), so TabbyAPI gets one check a second
in all. It runs on a thread of its own, never on the threads that serve pages.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from gantry.sockets import pages_open
from models_admin.fleet import backends, reconcile
from models_admin.models import Backend
from models_admin.policy_actions import Preload, unload_idle
from models_admin.rolling import resume_stale_rolls
from models_admin.services import WATCH_EVERY, check_backend, end_abandoned_load
from models_admin.signals import waiting_messages
from models_admin.swap_scheduler import schedule_swaps

log = logging.getLogger(__name__)
_preload = Preload()  # this process's: the `preload` models are loaded once, when it starts


def watch_round(preload: bool = True) -> float:
    """One look at the database, and a check of each TabbyAPI when one is needed; returns the seconds to
    wait. In a fleet (two backends or more) every backend is checked every second, so one that stops
    answering leaves the rotation within seconds, and one that returns gets its desired model again.
    Then the models' policies: idle models are unloaded, and (with `preload`, in the processes that
    start the fleet's work) the `preload` models loaded once at start; and held requests for a model no
    backend holds have it loaded (models_admin.swap_scheduler)."""
    fleet = backends()
    for backend in fleet:
        watch_backend(backend, every_second=len(fleet) > 1)
    if len(fleet) > 1:
        reconcile()
        resume_stale_rolls()
    unload_idle(fleet)  # the rows as the round began: an unload is claimed on the row as it is now
    schedule_swaps()
    if preload and not _preload.done:
        _preload.round(backends())  # as the checks left them
    return WATCH_EVERY


def watch_backend(backend: Backend, every_second: bool = False) -> None:
    if backend.is_busy:
        return  # the running operation reports the state (a dead one is reconciled by the refresh)
    if backend.abandoned_load and _nobody_follows(backend):
        log.warning("No process follows TabbyAPI's load of %s any more; taking the state from TabbyAPI", backend.abandoned_load)
        end_abandoned_load(backend.abandoned_load, backend)
        return
    if (every_second or backend.is_in_doubt or pages_open() or waiting_messages()) and _claim(backend):
        check_backend(backend)


def _nobody_follows(backend: Backend) -> bool:
    """The process that followed the load died (its beat stopped); TabbyAPI's `GET /v1/model` cannot
    tell a load that runs from one that failed, so the watch ends and the state is TabbyAPI's."""
    beat = backend.abandoned_beat or backend.abandoned_since
    return beat is None or beat < timezone.now() - timedelta(seconds=settings.GANTRY_OPERATION_STALE_AFTER)


def _claim(backend: Backend) -> bool:
    """Whether this process makes this second's check (one process in all, whichever comes first)."""
    now = timezone.now()
    due = Q(checked_at__isnull=True) | Q(checked_at__lte=now - timedelta(seconds=WATCH_EVERY * 0.8))
    return bool(Backend.objects.filter(pk=backend.pk).filter(due).update(checked_at=now))
