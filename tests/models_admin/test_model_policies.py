"""Model policies in a model's settings: checked like the other settings, never sent to TabbyAPI, read as a
Policy, and the questions asked before Gantry unloads on its own (pinned, minimum residency, idle time).
In-process (Django's test client); the live idle unloads and preloads are in test_model_policies_live.py."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from models_admin.fleet import reconcile
from models_admin.fleet_file import import_fleet, read_fleet
from models_admin.model_settings import ModelSettings, SettingsChange
from models_admin.models import Backend, LanguageModel, Operation
from models_admin.policies import Policy, idle_due, idle_unload_in, may_unload, policy_for, preloaded_models, unloaded_by_policy
from models_admin.policy_actions import preload
from models_admin.runner import _finish
from models_admin.settings_fields import SettingsInvalid, chat_defaults, clean, load_request

MODEL = "Tiny-Chat-5M"
URL = f"/api/admin/models/{MODEL}/settings"
pytestmark = pytest.mark.django_db


@pytest.fixture
def holding() -> Backend:
    """The default backend, holding MODEL since a minute ago, last used 30 s ago."""
    now = timezone.now()
    backend = Backend.objects.create(
        name="default",
        base_url="http://127.0.0.1:9",
        state=Backend.State.READY,
        active_model=MODEL,
        loaded_at=now - timedelta(seconds=60),
        used_at=now - timedelta(seconds=30),
    )
    LanguageModel.objects.create(backend=backend, name=MODEL)
    LanguageModel.objects.create(backend=backend, name="Small-Chat-200M")
    return backend


@pytest.fixture
def admin(holding: Backend) -> Client:
    client = Client()
    client.force_login(User.objects.create_user("root", password="pw-root-123", is_staff=True))
    return client


def refused(body: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SettingsInvalid) as caught:
        clean(body, 512)
    return caught.value.errors


def test_policies_are_checked_like_the_other_settings() -> None:
    values = clean(
        {"pinned": True, "idle_unload_after": 300, "preload": False, "min_residency": 60.0, "load_on_request": " Everyone "}, 512
    )
    assert values == {
        "pinned": True, "idle_unload_after": 300, "preload": False, "min_residency": 60, "load_on_request": "everyone"
    }
    assert clean({"idle_unload_after": None, "min_residency": "", "load_on_request": None}, 512) == {}

    errors = refused({"idle_unload_after": 0, "min_residency": 1.5, "pinned": "yes", "preload": 1, "load_on_request": "root"})
    assert errors["idle_unload_after"] == (
        "idle_unload_after must be a whole number of seconds from 1 to 31,536,000 (a year), or empty."
    )
    assert errors["min_residency"].startswith("min_residency must be a whole number of seconds")
    assert errors["pinned"] == "pinned must be true or false."
    assert errors["preload"] == "preload must be true or false."
    assert errors["load_on_request"] == "load_on_request must be one of nobody, admins, everyone."
    for wrong in (-5, True, "300", 40_000_000):
        assert "idle_unload_after" in refused({"idle_unload_after": wrong})


def test_policies_never_go_to_tabbyapi_nor_into_a_chat_request() -> None:
    values = clean({"max_seq_len": 2048, "temperature": 0.5, "pinned": True, "idle_unload_after": 60, "preload": True,
                    "min_residency": 30, "load_on_request": "nobody"}, 512)
    assert load_request(values) == {"max_seq_len": 2048}
    assert chat_defaults(values, 512) == ("", {"temperature": 0.5, "max_tokens": 512})


def test_a_models_policy_has_defaults_for_what_is_unset() -> None:
    defaults = Policy(pinned=False, idle_unload_after=None, preload=False, min_residency=None, load_on_request="admins")
    assert policy_for(MODEL) == defaults
    assert policy_for("") == Policy()
    ModelSettings.objects.create(model_name=MODEL, values={"pinned": True, "idle_unload_after": 5, "temperature": 0.3})
    assert policy_for(MODEL) == Policy(pinned=True, idle_unload_after=5)
    ModelSettings.objects.create(model_name="Small-Chat-200M", values={"preload": True})
    assert preloaded_models() == ["Small-Chat-200M"]


def test_policies_are_saved_audited_and_shown_through_the_api_and_the_page(admin: Client) -> None:
    body = {"pinned": True, "idle_unload_after": 120, "load_on_request": "everyone"}
    saved = admin.put(URL, body, content_type="application/json").json()
    assert saved["settings"]["pinned"] is True and saved["settings"]["idle_unload_after"] == 120
    assert saved["settings"]["preload"] is None and saved["changed"] == ["idle_unload_after", "load_on_request", "pinned"]
    change = SettingsChange.objects.get()
    assert change.sides() == ("pinned unset; idle_unload_after unset; load_on_request unset",
                              'pinned true; idle_unload_after 120; load_on_request "everyone"')

    wrong = admin.put(URL, {"load_on_request": "guests"}, content_type="application/json")
    assert wrong.status_code == 400 and "load_on_request" in wrong.json()["errors"]
    assert ModelSettings.objects.get(model_name=MODEL).values["load_on_request"] == "everyone"  # nothing lost

    page = admin.get(f"/admin/models/{MODEL}/settings/").content.decode()
    assert "<legend>Policies</legend>" in page
    for name in ("pinned", "idle_unload_after", "preload", "min_residency", "load_on_request"):
        assert f'id="setting-{name}"' in page and f'id="error-{name}"' in page
    assert '<option value="everyone">everyone</option>' in page and '<option value="">default (admins)</option>' in page


def test_a_fleet_file_carries_policies() -> None:
    report = import_fleet(read_fleet(f"version: 1\nmodels:\n  {MODEL}:\n    preload: true\n    idle_unload_after: 600\n"))
    assert report.changed_models == 1
    assert policy_for(MODEL) == Policy(preload=True, idle_unload_after=600)
    with pytest.raises(ValueError, match="load_on_request must be one of"):
        read_fleet(f"version: 1\nmodels:\n  {MODEL}:\n    load_on_request: anyone\n")


def test_gantry_may_unload_a_model_only_unpinned_and_after_its_minimum_residency(holding: Backend) -> None:
    assert holding.loaded_at is not None
    now = holding.loaded_at + timedelta(seconds=60)
    assert may_unload(holding, now)
    assert not may_unload(holding, now, Policy(pinned=True))
    assert not may_unload(holding, now, Policy(min_residency=120))  # loaded 60 s ago
    assert may_unload(holding, now, Policy(min_residency=60))
    ModelSettings.objects.create(model_name=MODEL, values={"pinned": True})
    assert not may_unload(holding, now)  # read from the model's settings


def test_the_idle_clock_counts_from_the_last_answer_or_the_load(holding: Backend) -> None:
    assert holding.loaded_at is not None
    now = holding.loaded_at + timedelta(seconds=60)
    assert idle_unload_in(holding, now, Policy()) is None
    assert idle_unload_in(holding, now, Policy(idle_unload_after=45), running=0) == pytest.approx(15)
    assert idle_unload_in(holding, now, Policy(idle_unload_after=45), running=1) == 45  # starts again when it ends
    assert idle_unload_in(holding, now, Policy(idle_unload_after=45, pinned=True)) is None
    assert idle_unload_in(holding, now, Policy(idle_unload_after=10, min_residency=100)) == pytest.approx(40)
    assert not idle_due(holding, now, Policy(idle_unload_after=45))
    assert idle_due(holding, now, Policy(idle_unload_after=30))
    assert not idle_due(holding, now, Policy(idle_unload_after=30, pinned=True))
    holding.used_at = None
    assert idle_unload_in(holding, now, Policy(idle_unload_after=45)) == pytest.approx(0)  # from the load, 60 s ago


def test_the_model_list_carries_the_pin_and_the_time_until_an_idle_unload(admin: Client) -> None:
    ModelSettings.objects.create(model_name=MODEL, values={"idle_unload_after": 90})
    ModelSettings.objects.create(model_name="Small-Chat-200M", values={"pinned": True, "idle_unload_after": 90})
    rows = {row["id"]: row for row in admin.get("/api/admin/models").json()["models"]}
    loaded, other = rows[MODEL], rows["Small-Chat-200M"]
    assert {"id", "name", "active", "last_load_seconds", "backends"} <= set(loaded)  # the contract, unchanged
    assert loaded["pinned"] is False and loaded["idle_unload_after"] == 90
    assert 55 <= loaded["idle_unload_in"] <= 60  # last used 30 s ago
    assert other["pinned"] is True and other["idle_unload_in"] is None  # not loaded (and pinned)

    page = admin.get("/admin/models/").content.decode()
    assert 'id="model-rows-data"' in page and 'aria-label="Pinned"' in page


def test_preload_never_unloads_anything_at_start(holding: Backend, caplog: pytest.LogCaptureFixture) -> None:
    ModelSettings.objects.create(model_name="Small-Chat-200M", values={"preload": True})
    with caplog.at_level(logging.WARNING, logger="models_admin.policy_actions"):
        assert preload(["Small-Chat-200M"], [holding]) == []
    assert "Not preloading Small-Chat-200M: no backend that has it holds nothing" in caplog.text
    holding.refresh_from_db()
    assert holding.active_model == MODEL and holding.operation_id is None
    assert preload([MODEL], [holding]) == []  # already held: nothing to do


def test_an_idle_unload_keeps_the_model_the_backend_should_hold_and_the_reconciler_leaves_it(
    holding: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    holding.desired_model = MODEL
    holding.save()
    other = Backend.objects.create(
        name="gpu-2", base_url="http://127.0.0.1:9", state=Backend.State.READY, active_model=MODEL, desired_model=MODEL
    )
    unload = Operation.objects.create(backend=other, kind=Operation.Kind.UNLOAD, source=Operation.Source.POLICY, from_model=MODEL)
    _finish(unload, Operation.Status.SUCCEEDED, active="")
    other.refresh_from_db()
    assert (other.state, other.active_model, other.desired_model) == (Backend.State.UNLOADED, "", MODEL)
    assert unloaded_by_policy(other)
    # Chat still follows the model (the default backend holds it); nothing loads it again on gpu-2.
    with caplog.at_level(logging.INFO, logger="models_admin.fleet"):
        assert reconcile() == 0
    assert "gpu-2" not in caplog.text

    # An admin's unload, by contrast, leaves the backend wanting nothing.
    admin_unload = Operation.objects.create(
        backend=holding, kind=Operation.Kind.UNLOAD, source=Operation.Source.API, from_model=MODEL
    )
    _finish(admin_unload, Operation.Status.SUCCEEDED, active="")
    holding.refresh_from_db()
    assert holding.desired_model == "" and not unloaded_by_policy(holding)
