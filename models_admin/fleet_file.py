"""A fleet in one YAML file: the backends (never their keys) and the models' settings, so a fleet can be
kept in git and set up again with one command (`export_fleet`, `import_fleet`).

    version: 1
    backends:
      - name: default
        url: http://127.0.0.1:5000
    models:
      Tiny-Chat-5M:
        max_seq_len: 2048
        temperature: 0.7
        system_prompt: You are a helpful assistant.

An import checks the whole file before writing anything, then writes it in one transaction. It adds and
updates; it removes nothing (a backend or a model's settings missing from the file stay as they are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml
from django.conf import settings
from django.db import transaction

from models_admin.fleet import NAME
from models_admin.model_settings import ModelSettings, Source, save_settings
from models_admin.models import DEFAULT_BACKEND, Backend
from models_admin.settings_fields import SettingsInvalid, Values, changes, clean

VERSION = 1
# What a backend is in the file, and the Backend field each key is: a field added to backends (never a
# key, which stays out of files kept in git) is one more entry here.
BACKEND_FIELDS = {"name": "name", "url": "base_url"}
REQUIRED_BACKEND_KEYS = ("name", "url")


class FleetInvalid(ValueError):
    """The file cannot be imported: one sentence per problem, naming where it is."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class Fleet:
    backends: list[dict[str, str]] = field(default_factory=list)
    models: dict[str, Values] = field(default_factory=dict)


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    added: int = 0
    updated: int = 0
    changed_models: int = 0
    unchanged: int = 0

    def summary(self) -> str:
        backends = f"{self.added} backend{'s' if self.added != 1 else ''} added, {self.updated} updated"
        models = f"settings of {self.changed_models} model{'s' if self.changed_models != 1 else ''} changed"
        return f"{backends}, {models}, {self.unchanged} unchanged."


# Export


def export_fleet() -> str:
    backends = [{key: getattr(b, column) for key, column in BACKEND_FIELDS.items()} for b in Backend.objects.order_by("name")]
    models = {row.model_name: dict(row.values) for row in ModelSettings.objects.order_by("model_name") if row.values}
    head = "# A Gantry fleet: its model servers (without their keys) and each model's settings.\n"
    return head + yaml.safe_dump(
        {"version": VERSION, "backends": backends, "models": models}, sort_keys=False, allow_unicode=True
    )


# Import


def read_fleet(text: str) -> Fleet:
    """The fleet a file describes, every part checked; raises FleetInvalid naming every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FleetInvalid([f"The file is not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise FleetInvalid(["The file must be a mapping with `version`, `backends` and `models`."])
    problems = [
        f"`{key}` is not part of a fleet file (it has version, backends and models)."
        for key in data
        if key not in ("version", "backends", "models")
    ]
    if data.get("version", VERSION) != VERSION:
        problems.append(f"This file is version {data.get('version')!r}; this Gantry reads version {VERSION}.")
    fleet = Fleet(_backends(data.get("backends") or [], problems), _models(data.get("models") or {}, problems))
    if problems:
        raise FleetInvalid(problems)
    return fleet


def _backends(items: Any, problems: list[str]) -> list[dict[str, str]]:
    if not isinstance(items, list):
        problems.append("`backends` must be a list of {name, url}.")
        return []
    backends, names = [], set()
    for number, item in enumerate(items, start=1):
        where = f"backends, item {number}"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be a mapping with {', '.join(REQUIRED_BACKEND_KEYS)}.")
            continue
        problems += [
            f"{where}: `{key}` is not a backend field here (keys never go in a fleet file; the fields are "
            f"{', '.join(BACKEND_FIELDS)})."
            for key in item
            if key not in BACKEND_FIELDS
        ]
        problems += [f"{where}: `{key}` is missing." for key in REQUIRED_BACKEND_KEYS if key not in item]
        name, url = item.get("name"), item.get("url")
        if "name" in item and (not isinstance(name, str) or not NAME.match(name.strip())):
            problems.append(f"{where}: a backend's name is 1 to 64 lowercase letters, digits and dashes (not at either end), like gpu-2.")
        elif isinstance(name, str) and name.strip() in names:
            problems.append(f"{where}: the name {name.strip()} is used twice.")
        if "url" in item and not _is_url(url):
            problems.append(f"{where}: url must be an http:// or https:// address, like http://gpu-1:5000.")
        if isinstance(name, str) and isinstance(url, str):
            names.add(name.strip())
            backends.append({"name": name.strip(), "url": url.strip().rstrip("/")})
    return backends


def _is_url(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 500:
        return False
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _models(items: Any, problems: list[str]) -> dict[str, Values]:
    if not isinstance(items, dict):
        problems.append("`models` must map each model's name to its settings.")
        return {}
    models = {}
    for name, values in items.items():
        if not isinstance(name, str) or not 0 < len(name) <= 200 or "/" in name:
            problems.append(f"models: {name!r} is not a model folder name.")
            continue
        try:
            models[name] = clean(values if values is not None else {}, settings.GANTRY_MAX_ANSWER_TOKENS)
        except SettingsInvalid as exc:
            problems += [f"models, {name}: {sentence}" for sentence in exc.errors.values()]
    return models


def import_fleet(fleet: Fleet, dry_run: bool = False) -> Report:
    """Write the fleet in one transaction (none with `dry_run`); report what changed."""
    report = Report()
    with transaction.atomic():
        for backend in fleet.backends:
            _import_backend(backend, report)
        for name, values in fleet.models.items():
            if dry_run:
                changed = changes(ModelSettings.objects.values_of(name), values)
            else:
                changed = save_settings(name, values, None, Source.COMMAND)
            if changed:
                report.changed_models += 1
                report.lines += [f"{name}: {setting} {_text(old)} → {_text(new)}" for setting, (old, new) in changed.items()]
            else:
                report.unchanged += 1
        if dry_run:
            transaction.set_rollback(True)
    return report


def _import_backend(item: dict[str, str], report: Report) -> None:
    fields = {column: item[key] for key, column in BACKEND_FIELDS.items() if key != "name"}
    backend = Backend.objects.select_for_update().filter(name=item["name"]).first()
    if item["name"] == DEFAULT_BACKEND:
        # The default backend is the server of TABBY_HOST, with the settings' keys: a file does not move it.
        if backend is not None and backend.base_url != item["url"]:
            report.lines.append(f"backend default: its URL comes from TABBY_HOST ({backend.base_url}); {item['url']} not taken")
        report.unchanged += 1
        return
    if backend is None:
        Backend.objects.create(name=item["name"], **fields)
        report.added += 1
        report.lines.append(
            f"backend {item['name']}: added ({item['url']}); give it its keys in the Backends tab "
            f"(or PATCH /api/admin/backends/{item['name']}/) before it can answer"
        )
        return
    differ = {column: value for column, value in fields.items() if getattr(backend, column) != value}
    if not differ:
        report.unchanged += 1
        return
    for column, value in differ.items():
        report.lines.append(f"backend {item['name']}: {column} {getattr(backend, column)} → {value}")
        setattr(backend, column, value)
    backend.save(update_fields=[*differ, "updated"])
    report.updated += 1


def _text(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)
