"""Per-model settings: checked one by one and together, saved, audited, shown, and turned into what goes to
TabbyAPI (the load request's fields, a chat request's defaults and system prompt). In-process (Django's test
client); the live loads and answers are in test_model_settings_live.py."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from chat.generation import history
from chat.models import Conversation
from chat.streaming import Prompt
from models_admin.model_settings import ModelSettings, SettingsChange
from models_admin.models import Backend, LanguageModel, Operation
from models_admin.views import ACTIVITY_ROWS
from models_admin.settings_fields import SettingsInvalid, chat_defaults, clean, load_request

MODEL = "Tiny-Chat-5M"
URL = f"/api/admin/models/{MODEL}/settings"
pytestmark = pytest.mark.django_db


@pytest.fixture
def seen() -> Backend:
    """The default backend, which has listed MODEL and holds it."""
    backend = Backend.objects.create(name="default", base_url="http://127.0.0.1:9", state=Backend.State.READY, active_model=MODEL)
    LanguageModel.objects.create(backend=backend, name=MODEL)
    return backend


@pytest.fixture
def admin(seen: Backend) -> Client:
    client = Client()
    client.force_login(User.objects.create_user("root", password="pw-root-123", is_staff=True))
    return client


def put(client: Client, body: Any, **headers: str) -> Any:
    return client.put(URL, body, content_type="application/json", headers=headers)


def test_a_models_settings_are_saved_and_read_back_with_every_setting_named(admin: Client) -> None:
    fresh = admin.get(URL).json()
    assert fresh["model_id"] == MODEL and fresh["updated"] is None
    assert set(fresh["settings"]) >= {"max_seq_len", "cache_mode", "draft_model", "gpu_split", "temperature", "system_prompt"}
    assert all(value is None for value in fresh["settings"].values())

    body = {
        "max_seq_len": 4096,
        "cache_mode": "q8",
        "rope_alpha": "auto",
        "gpu_split_auto": False,
        "gpu_split": [20, 24.5],
        "temperature": 0.7,
        "top_k": 40,
        "max_tokens": 64,
        "system_prompt": "  You are terse.  ",
    }
    saved = put(admin, body)
    assert saved.status_code == 200, saved.content
    answer = saved.json()
    assert answer["changed"] == sorted(body)
    assert answer["settings"]["cache_mode"] == "Q8"  # as TabbyAPI spells it
    assert answer["settings"]["gpu_split"] == [20.0, 24.5]
    assert answer["settings"]["system_prompt"] == "You are terse."
    assert answer["settings"]["top_p"] is None
    assert answer["updated_by"] == "root" and answer["loaded"] is True
    assert admin.get(URL).json()["settings"] == answer["settings"]
    # PUT replaces: what is left out is unset again.
    assert put(admin, {"temperature": 0.7}).json()["settings"]["max_seq_len"] is None


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"max_seq_len": 4096, "colour": "blue"}, "colour", "colour is not a model setting; the settings are max_seq_len"),
        ({"max_seq_len": "4096"}, "max_seq_len", "max_seq_len must be a whole number."),
        ({"max_seq_len": 2.5}, "max_seq_len", "max_seq_len must be a whole number."),
        ({"max_seq_len": 0}, "max_seq_len", "max_seq_len must be from 16 to 1,048,576."),
        ({"cache_size": 1000}, "cache_size", "cache_size must be a multiple of 256 (say 1024)."),
        ({"cache_size": 1024, "max_seq_len": 2048}, "cache_size", "cache_size (1,024) is smaller than max_seq_len (2,048)"),
        ({"cache_mode": "FP8"}, "cache_mode", "cache_mode must be one of FP16, Q8, Q6, Q4."),
        ({"rope_alpha": "high"}, "rope_alpha", 'rope_alpha must be a number more than 0 and at most 100, or "auto".'),
        ({"rope_scale": 0}, "rope_scale", "rope_scale must be more than 0 and at most 64."),
        ({"gpu_split": [20, 24]}, "gpu_split", "gpu_split is used only when gpu_split_auto is false"),
        ({"gpu_split_auto": "yes"}, "gpu_split_auto", "gpu_split_auto must be true or false."),
        ({"draft_model": "../elsewhere/model"}, "draft_model", "draft_model must be the name of a model folder"),
        ({"temperature": True}, "temperature", "temperature must be a number."),
        ({"top_p": 1.5}, "top_p", "top_p must be more than 0 and at most 1."),
        (
            {"max_tokens": 100_000},
            "max_tokens",
            "max_tokens must be at most 512, the site's longest answer (GANTRY_MAX_ANSWER_TOKENS).",
        ),
        ({"system_prompt": 42}, "system_prompt", "system_prompt must be text."),
    ],
)
def test_a_wrong_setting_is_refused_with_a_sentence_naming_it_and_nothing_is_saved(
    admin: Client, body: dict[str, Any], field: str, says: str
) -> None:
    put(admin, {"temperature": 0.5})
    refused = put(admin, {"temperature": 0.9, **body})
    assert refused.status_code == 400
    answer = refused.json()
    assert answer["detail"] == "Some settings were not saved: see `errors`, one sentence per setting."
    assert says in answer["errors"][field]
    assert admin.get(URL).json()["settings"]["temperature"] == 0.5
    assert SettingsChange.objects.count() == 1


def test_a_body_that_is_not_an_object_is_refused(admin: Client) -> None:
    for body in ([1, 2], "text", None):
        refused = put(admin, body)
        assert refused.status_code == 400
        assert "Send the settings as a JSON object" in refused.json()["errors"][""]


def test_a_model_nobody_has_seen_has_no_settings(admin: Client) -> None:
    for answer in (
        admin.get("/api/admin/models/No-Such-Model/settings"),
        admin.put("/api/admin/models/No-Such-Model/settings", {}, content_type="application/json"),
    ):
        assert answer.status_code == 404
        assert answer.json() == {"detail": "There is no model named No-Such-Model."}
    assert admin.get("/admin/models/No-Such-Model/settings/").status_code == 404


def test_only_admins_see_or_change_settings_and_browsers_only_from_this_site(seen: Backend, admin: Client) -> None:
    assert Client().get(URL).status_code == 401
    member = Client()
    member.force_login(User.objects.create_user("member", password="pw-member-123"))
    assert member.get(URL).status_code == 403
    assert put(member, {"temperature": 0.1}).status_code == 403
    assert put(admin, {"temperature": 0.1}, Origin="https://elsewhere.example").status_code == 403
    assert admin.put(URL, "temperature=0.1", content_type="text/plain").status_code == 415
    assert admin.post(URL, {}, content_type="application/json").status_code == 405
    assert not ModelSettings.objects.values_of(MODEL)


def test_each_change_is_audited_and_shown_in_the_activity_log(admin: Client) -> None:
    put(admin, {"max_seq_len": 4096}, **{"X-Gantry-Source": "dashboard"})
    put(admin, {"max_seq_len": 4096})  # nothing changes: nothing is logged
    put(admin, {"max_seq_len": 2048, "system_prompt": "Be brief."})
    changes = list(SettingsChange.objects.order_by("id"))
    assert [(c.source, c.changes) for c in changes] == [
        ("dashboard", {"max_seq_len": [None, 4096]}),
        ("api", {"max_seq_len": [4096, 2048], "system_prompt": [None, "Be brief."]}),
    ]
    assert all(c.requested_by is not None and c.requested_by.get_username() == "root" for c in changes)
    page = admin.get("/admin/activity/").content.decode()
    assert page.count('class="settings-change"') == 2
    assert f'Settings of <a href="/admin/models/{MODEL}/settings/">{MODEL}</a>' in page
    assert "max_seq_len 4096; system_prompt unset" in page and "max_seq_len 2048; system_prompt &quot;Be brief.&quot;" in page
    assert 'root <span class="via">via dashboard</span>' in page and 'root <span class="via">via API</span>' in page
    assert page.index("max_seq_len 2048") < page.index("max_seq_len unset")  # newest first


def test_the_activity_log_names_who_asked_and_the_backend_newest_first_and_stops_at_its_limit(seen: Backend, admin: Client) -> None:
    second = Backend.objects.create(name="second", base_url="http://127.0.0.1:8")
    ann = User.objects.create_user("ann")
    for n in range(ACTIVITY_ROWS + 5):
        Operation.objects.create(backend=seen, kind=Operation.Kind.SWITCH, status=Operation.Status.SUCCEEDED, to_model=f"old-{n}")
    Operation.objects.create(backend=second, kind=Operation.Kind.UNLOAD, status=Operation.Status.FAILED, requested_by=ann, error="gone")
    Operation.objects.create(backend=seen, kind=Operation.Kind.SWITCH, source=Operation.Source.DASHBOARD, requested_by=ann, to_model="Tiny")
    put(admin, {"max_seq_len": 4096})
    page = admin.get("/admin/activity/").content.decode()
    assert page.count("<tr class=") == ACTIVITY_ROWS
    newest = [page.index(text) for text in ("max_seq_len 4096", 'ann <span class="via">via dashboard</span>', "Unload <span")]
    assert newest == sorted(newest)
    assert 'Unload <span class="via">on second</span>' in page and "gone" in page
    assert f"old-{ACTIVITY_ROWS + 4}" in page and "old-0<" not in page  # the oldest fall off


def test_the_settings_page_has_a_field_for_every_setting(admin: Client) -> None:
    put(admin, {"top_k": 40})
    page = admin.get(f"/admin/models/{MODEL}/settings/").content.decode()
    for name in (
        "max_seq_len",
        "cache_mode",
        "cache_size",
        "chunk_size",
        "rope_scale",
        "rope_alpha",
        "draft_model",
        "prompt_template",
        "gpu_split_auto",
        "gpu_split",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "max_tokens",
        "system_prompt",
    ):
        assert f'id="setting-{name}"' in page and f'id="error-{name}"' in page
    assert "top_k unset → top_k 40" in page


def test_load_parameters_become_tabbyapis_load_fields() -> None:
    values = clean({"max_seq_len": 4096, "cache_size": 4096, "draft_model": "Tiny-Draft", "temperature": 0.2}, 512)
    assert load_request(values) == {"max_seq_len": 4096, "cache_size": 4096, "draft_model": {"draft_model_name": "Tiny-Draft"}}
    ModelSettings.objects.create(model_name=MODEL, values=values)
    assert ModelSettings.objects.load_request(MODEL)["draft_model"] == {"draft_model_name": "Tiny-Draft"}
    assert ModelSettings.objects.load_request("Other-Model") == {}


def test_generation_defaults_fill_a_chat_request_within_the_sites_answer_cap() -> None:
    assert chat_defaults({}, 512) == ("", {"max_tokens": 512})
    system, params = chat_defaults(clean({"temperature": 0, "max_tokens": 32, "system_prompt": "Be brief."}, 512), 512)
    assert (system, params) == ("Be brief.", {"temperature": 0.0, "max_tokens": 32})
    assert chat_defaults({"max_tokens": 400}, 100)[1]["max_tokens"] == 100  # the site's cap was lowered since
    with pytest.raises(SettingsInvalid):
        clean({"max_tokens": 600}, 512)


def test_the_conversation_sent_starts_with_the_served_models_system_prompt(seen: Backend) -> None:
    owner = User.objects.create_user("writer", password="pw-writer-123")
    conversation = Conversation.objects.create(owner=owner)
    ModelSettings.objects.create(model_name=MODEL, values={"system_prompt": "Answer in French.", "top_p": 0.5})
    prompt = history(conversation.pk, "Hello")
    assert prompt.messages() == [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    assert prompt.params == {"top_p": 0.5, "max_tokens": 512}
    assert history(conversation.pk, "Hello", model="Other-Model") == Prompt(
        [{"role": "user", "content": "Hello"}], "", {"max_tokens": 512}
    )
    long = Prompt(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "S"
    )
    assert long.shortened().messages() == [{"role": "system", "content": "S"}, {"role": "user", "content": "c"}]
