"""Usage: what each user's answers cost, by model and day (requests, tokens, time held and generating).

Counted as each answer ends by itself (`done`): chat's answers and the OpenAI-compatible API's alike,
with the model server's own token counts. A stopped, failed or cut-off answer is not counted (a cut-off
one is queued again and counted once, when it is answered); what was counted stays when its
conversation is deleted (an API request's is, as soon as the request ends).

The Admin Dashboard's Usage tab and /metrics read the table (`report`, `totals`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, TypedDict

from django.db import connection
from django.db.models import Sum
from django.utils import timezone

from chat.models import Conversation, Usage

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "hold_seconds", "generation_seconds")
MAX_DAYS = 366


@dataclass(frozen=True)
class Spent:
    """One answer's cost: the model server's token counts, and seconds held and generating."""

    prompt_tokens: int
    completion_tokens: int
    hold_seconds: float
    generation_seconds: float


def record(conversation_id: int, model: str, spent: Spent) -> None:
    """Add one answered request to its conversation's owner's row for `model` and today.

    One statement whatever the day: an upsert whose counters add up in the database, so answers ending
    at once in several processes are all counted, the day's first two included. The owner is read in
    the same statement (a conversation already deleted counts nothing)."""
    table = connection.ops.quote_name(Usage._meta.db_table)
    conversations = connection.ops.quote_name(Conversation._meta.db_table)
    added = ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in COUNTERS)
    sql = (
        f"INSERT INTO {table} (user_id, model_name, day, {', '.join(COUNTERS)})"
        f" SELECT owner_id, %s, %s, 1, %s, %s, %s, %s FROM {conversations} WHERE id = %s"
        f" ON CONFLICT (user_id, model_name, day) DO UPDATE SET {added}"
    )
    today = connection.ops.adapt_datefield_value(timezone.localdate())
    params: list[Any] = [model, today, max(0, spent.prompt_tokens), max(0, spent.completion_tokens)]
    params += [max(0.0, spent.hold_seconds), max(0.0, spent.generation_seconds), conversation_id]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


# Reading it


class Counters(TypedDict):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    hold_seconds: float
    generation_seconds: float


class Row(Counters):
    user: str
    model: str


class Day(Counters):
    day: str


class Report(TypedDict):
    days: int
    since: str
    until: str
    rows: list[Row]
    totals: Counters
    per_day: list[Day]


def _counters(found: Mapping[str, Any]) -> Counters:
    return Counters(
        requests=int(found.get("requests") or 0),
        prompt_tokens=int(found.get("prompt_tokens") or 0),
        completion_tokens=int(found.get("completion_tokens") or 0),
        hold_seconds=round(float(found.get("hold_seconds") or 0.0), 3),
        generation_seconds=round(float(found.get("generation_seconds") or 0.0), 3),
    )


def _sums() -> dict[str, Sum]:
    return {name: Sum(name) for name in COUNTERS}


def report(days: int) -> Report:
    """The last `days` days, today included: a row a user and model (most tokens first), the totals, and
    every day's figures (days without answers too, for the chart)."""
    until = timezone.localdate()
    since = until - timedelta(days=days - 1)
    period = Usage.objects.filter(day__gte=since, day__lte=until)
    grouped = period.values("user__username", "model_name").annotate(**_sums())
    rows = [Row(user=found["user__username"], model=found["model_name"], **_counters(found)) for found in grouped]
    rows.sort(key=lambda row: (-(row["prompt_tokens"] + row["completion_tokens"]), row["user"], row["model"]))
    by_day = {found["day"]: found for found in period.values("day").annotate(**_sums())}
    per_day = [Day(day=day.isoformat(), **_counters(by_day.get(day, {}))) for day in _dates(since, until)]
    return Report(
        days=days,
        since=since.isoformat(),
        until=until.isoformat(),
        rows=rows,
        totals=_counters(period.aggregate(**_sums())),
        per_day=per_day,
    )


def _dates(since: date, until: date) -> list[date]:
    return [since + timedelta(days=n) for n in range((until - since).days + 1)]


def totals() -> list[Row]:
    """Every day's figures added up, a row a user and model (for /metrics' counters)."""
    grouped = Usage.objects.values("user__username", "model_name").annotate(**_sums()).order_by("user__username", "model_name")
    return [Row(user=found["user__username"], model=found["model_name"], **_counters(found)) for found in grouped]
