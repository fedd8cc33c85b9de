"""Personal keys (made, hashed, found, revoked, seen by whom) and the OpenAI-compatible API's checks of
what callers send: in-process, with Django's test client; the live answers are in test_openai_live.py."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from chat.models import Conversation
from chat.prompts import asked
from gateway import keys
from gateway.exchange import requested_model, waiting_text
from gateway.models import ApiKey
from gateway.openai_input import ApiError, chat_request, completion_request, json_body
from models_admin.model_settings import ModelSettings
from models_admin.models import Backend, LanguageModel

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice() -> User:
    return User.objects.create_user("alice", password="pw-alice-123")


def session(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_key_is_kept_only_as_its_digest(alice: User) -> None:
    row, key = keys.create_key(alice, "  laptop   one ")
    assert key.startswith(keys.KEY_PREFIX) and len(key) > 40
    assert row.name == "laptop one"
    assert row.digest == hashlib.sha256(key.encode()).hexdigest()
    assert row.prefix == key[: keys.SHOWN_CHARACTERS]
    stored = ApiKey.objects.values_list(*[f.attname for f in ApiKey._meta.fields]).get()
    assert key not in [str(value) for value in stored]
    assert keys.create_key(alice, "other")[1] != key


def test_a_key_acts_as_its_user_until_revoked_or_deactivated(alice: User) -> None:
    row, key = keys.create_key(alice, "laptop")
    assert row.last_used is None
    assert keys.user_of(key) == alice
    row.refresh_from_db()
    assert row.last_used is not None
    assert keys.user_of(key[:-1]) is None
    assert keys.user_of("x" * 10_000) is None
    assert keys.user_of("gsk_é") is None
    alice.is_active = False
    alice.save()
    assert keys.user_of(key) is None
    alice.is_active = True
    alice.save()
    assert keys.revoke(alice, row.pk)
    assert keys.user_of(key) is None


@pytest.mark.parametrize(
    ("name", "sentence"),
    [(None, "as text"), ("   ", "Give the key a name"), ("a" * 101, "the limit is 100"), ("a\x00b", "cannot be stored")],
)
def test_a_key_needs_a_name(alice: User, name: Any, sentence: str) -> None:
    response = session(alice).post("/api/keys", {"name": name}, content_type="application/json")
    assert response.status_code == 400
    assert sentence in response.json()["detail"]
    assert not ApiKey.objects.exists()


def test_the_keys_api_shows_a_key_once_and_admins_see_every_key(alice: User) -> None:
    bob = User.objects.create_user("bob", password="pw-bob-123")
    root = User.objects.create_user("root", password="pw-root-123", is_staff=True)
    made = session(alice).post("/api/keys", {"name": "laptop"}, content_type="application/json")
    assert made.status_code == 201
    body = made.json()
    assert set(body) >= {"id", "name", "key"} and body["name"] == "laptop"
    listed = session(alice).get("/api/keys").json()
    assert [k["name"] for k in listed] == ["laptop"] and "key" not in listed[0]
    assert body["key"] not in str(listed)
    assert session(bob).get("/api/keys").json() == []
    assert session(bob).delete(f"/api/keys/{body['id']}/").status_code == 404
    assert [(k["name"], k["owner"]) for k in session(root).get("/api/keys").json()] == [("laptop", "alice")]
    assert session(root).delete(f"/api/keys/{body['id']}/").status_code == 204
    assert session(alice).get("/api/keys").json() == []
    assert Client().get("/api/keys").status_code == 401


def test_the_keys_page_lists_keys_without_them(alice: User) -> None:
    _, key = keys.create_key(alice, "notebook server")
    page = session(alice).get("/keys/")
    assert page.status_code == 200
    assert b"notebook server" in page.content and key.encode() not in page.content
    assert Client().get("/keys/").status_code == 302


def openai_error(response: Any, status: int, code: str | None) -> str:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["code"] == code
    return str(error["message"])


# The API's views are async: their database work runs in the web threads, on connections of their own.
@pytest.mark.django_db(transaction=True)
def test_the_api_refuses_callers_without_a_valid_key_in_openais_shape(alice: User) -> None:
    client = Client()
    assert "Authorization: Bearer" in openai_error(client.get("/v1/models"), 401, "invalid_api_key")
    assert "not valid" in openai_error(client.get("/v1/models", HTTP_AUTHORIZATION="Bearer gsk_nope"), 401, "invalid_api_key")
    row, key = keys.create_key(alice, "laptop")
    keys.revoke(alice, row.pk)
    assert "revoked" in openai_error(
        client.post("/v1/chat/completions", {}, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}"),
        401,
        "invalid_api_key",
    )
    # A key opens the OpenAI-compatible API only: the chat API still asks for a session.
    _, key = keys.create_key(alice, "laptop")
    assert client.get("/api/conversations/", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 401


# The API's views are async: their database work runs in the web threads, on connections of their own.
@pytest.mark.django_db(transaction=True)
def test_bad_requests_are_refused_before_anything_is_queued(alice: User) -> None:
    _, key = keys.create_key(alice, "laptop")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {key}")

    def post(path: str, body: Any) -> Any:
        return client.post(path, body, content_type="application/json")

    assert "JSON object" in openai_error(client.post("/v1/chat/completions", "[1]", content_type="application/json"), 400, None)
    assert "messages" in openai_error(post("/v1/chat/completions", {"messages": []}), 400, "invalid_value")
    assert "temperature" in openai_error(
        post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 9}), 400, "invalid_value"
    )
    assert "prompt" in openai_error(post("/v1/completions", {"prompt": ["a", "b"]}), 400, "invalid_value")
    assert openai_error(client.get("/v1/chat/completions"), 405, "method_not_allowed")
    assert not Conversation.objects.exists()


def test_a_chat_request_is_read_as_written() -> None:
    body = {
        "model": "anything",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Capital of Japan?"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 7,
        "stop": "\n",
        "temperature": 0,
        "top_k": 1,
        "seed": 3,
        "user": "ignored",
    }
    request = chat_request(body)
    assert request.stream and request.include_usage and request.model == "anything"
    assert request.content == "Capital of Japan?"
    assert request.request["messages"][0] == {"role": "system", "content": "Be brief."}
    assert request.request["messages"][1]["content"] == "Hello there"
    assert request.params == {"temperature": 0, "top_k": 1, "seed": 3, "max_tokens": 7, "stop": ["\n"]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": float("nan")}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "x" * 40_000}]}, "messages[0].content"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        chat_request(body)
    assert refused.value.status == 400 and refused.value.param == param
    assert param.split("[")[0] in refused.value.message


def test_a_completion_request_and_a_body_that_is_no_json() -> None:
    request = completion_request({"prompt": ["Once upon a time"], "max_tokens": 5})
    assert request.kind == "completion" and request.request == {"prompt": "Once upon a time", "params": {"max_tokens": 5}}
    with pytest.raises(ApiError, match="not valid JSON"):
        json_body(b"{nope")


def test_the_prompt_keeps_the_callers_fields_within_the_sites_cap(settings: Any) -> None:
    settings.GANTRY_MAX_ANSWER_TOKENS = 20
    prompt = asked({"messages": [{"role": "user", "content": "Hi"}], "params": {"max_tokens": 500, "temperature": 0.5}}, "M")
    assert prompt.params["max_tokens"] == 20 and prompt.params["temperature"] == 0.5
    assert prompt.fixed and prompt.messages() == [{"role": "user", "content": "Hi"}]
    completion = asked({"prompt": "Once", "params": {}}, "M")
    assert completion.text == "Once" and completion.params["max_tokens"] == 20


def test_a_held_request_hears_what_it_waits_for() -> None:
    progress = {"step": "loading", "model": "Large-Chat-1G", "percent": 63.2}
    assert waiting_text(progress, None, 3) == "loading Large-Chat-1G 63%, 2 requests ahead"
    assert waiting_text(progress, None, 2) == "loading Large-Chat-1G 63%, 1 request ahead"
    assert (
        waiting_text(None, {"state": "unreachable"}, 1)
        == "waiting for the model server, which cannot be reached, no requests ahead"
    )
    assert waiting_text(None, None, None) == "waiting for the model"


def test_a_requests_model_is_served_loaded_waited_for_or_refused(alice: User) -> None:
    """Which model a request waits for: none named follows the default; a model served or being loaded is
    waited for; one a backend has is loaded when its policy lets the caller, else 403; an unknown name is
    404; the default model's name, for a caller who may not load it, follows the default."""
    default = Backend.objects.create(
        name="default", base_url="http://127.0.0.1:9", state=Backend.State.UNLOADED, desired_model="Tiny"
    )
    second = Backend.objects.create(name="gpu-2", base_url="http://127.0.0.1:8", state=Backend.State.READY, active_model="Small")
    for name in ("Tiny", "Small", "Large"):
        LanguageModel.objects.create(backend=default, name=name)
    LanguageModel.objects.create(backend=second, name="Small")
    root = User.objects.create_user("root", password="pw-root-123", is_staff=True)
    assert [requested_model(alice, name) for name in (None, "", "Small", "Tiny")] == ["", "", "Small", ""]
    assert requested_model(root, "Tiny") == "Tiny"  # an admin's request has the default model loaded
    with pytest.raises(ApiError) as forbidden:
        requested_model(alice, "Large")
    assert (forbidden.value.status, forbidden.value.code, forbidden.value.param) == (403, "model_not_loadable", "model")
    ModelSettings.objects.create(model_name="Large", values={"load_on_request": "everyone"})
    assert requested_model(alice, "Large") == "Large"
    with pytest.raises(ApiError) as unknown:
        requested_model(root, "gpt-4o")
    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")
    ModelSettings.objects.filter(model_name="Large").update(values={"load_on_request": "nobody"})
    Backend.objects.filter(pk=second.pk).update(state=Backend.State.SWITCHING, target_model="Large")
    assert requested_model(alice, "Large") == "Large"  # loading already: waited for, whoever asks


# The API's views are async: their database work runs in the web threads, on connections of their own.
@pytest.mark.django_db(transaction=True)
def test_models_lists_the_served_models_then_those_the_caller_may_have_loaded(alice: User) -> None:
    default = Backend.objects.create(name="default", base_url="http://127.0.0.1:9", state=Backend.State.READY, active_model="Tiny")
    for name in ("Tiny", "Small", "Large", "Huge"):
        LanguageModel.objects.create(backend=default, name=name)
    ModelSettings.objects.create(model_name="Large", values={"load_on_request": "everyone"})
    ModelSettings.objects.create(model_name="Huge", values={"load_on_request": "nobody"})
    root = User.objects.create_user("root", password="pw-root-123", is_staff=True)

    def listed(user: User) -> list[str]:
        _, key = keys.create_key(user, "laptop")
        response = Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key}")
        assert response.status_code == 200, response.content
        assert {(m["object"], m["owned_by"]) for m in response.json()["data"]} == {("model", "gantry")}
        return [model["id"] for model in response.json()["data"]]

    assert listed(alice) == ["Tiny", "Large"]  # a member may have Large loaded (everyone), not Small (admins)
    assert listed(root) == ["Tiny", "Large", "Small"]  # served first, then loadable by name; never Huge
