"""Hostile input on the live site: text that cannot be stored, titles that are not text or too long,
JSON nested too deeply, requests a browser marks as cross-site, admin bodies that do not say they are
JSON. Each is refused with a sentence, the same way on every path; none is a 500."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from harness.site import ADMIN, MEMBER, Site
from tests.chat.hostile import assert_refused_alike, socket_reply, unstorable_text_everywhere

CROSS_SITE = {"detail": "Cross-site requests are refused."}
NOT_TEXT = {"detail": "A conversation's title must be text."}
TOO_DEEP = {"detail": "JSON parse error - nested too deeply."}
MALFORMED = 'Send JSON objects like {"type": "chat.send", "content": "Hello", "ref": 1}.'
NESTED = "[" * 100_000 + "]" * 100_000


async def test_nul_and_lone_surrogates_are_refused_the_same_way_on_every_path(site: Site) -> None:
    with site.session(MEMBER) as client:
        before = client.get("/api/conversations/").json()
        answers = await unstorable_text_everywhere(site, client)
        after = client.get("/api/conversations/").json()
    assert_refused_alike(answers)
    assert len(after) == len(before) + 1  # only the conversation the test made itself


def test_a_title_must_be_text_with_one_length_rule_for_create_and_rename(site: Site) -> None:
    too_long = {"detail": "This title has 201 characters; the limit is 200. Shorten it and try again."}
    with site.session(MEMBER) as client:
        conversation = client.post("/api/conversations/", json={"title": "Keep me"}).json()
        base = f"/api/conversations/{conversation['id']}/"
        def both(title: Any) -> tuple[httpx.Response, httpx.Response]:
            return client.post("/api/conversations/", json={"title": title}), client.patch(base, json={"title": title})

        for title in (123, 4.5, True, None, ["a"], {"a": 1}):
            created, renamed = both(title)
            assert (created.status_code, created.json()) == (400, NOT_TEXT), title
            assert (renamed.status_code, renamed.json()) == (400, NOT_TEXT), title
        created, renamed = both("t" * 201)
        assert (created.status_code, created.json()) == (400, too_long)
        assert (renamed.status_code, renamed.json()) == (400, too_long)
        assert client.get(base).json()["title"] == "Keep me"
        created, renamed = both(f"  {'t' * 200}  ")  # trimmed first, on both
        not_an_object = client.post("/api/conversations/", json=["Trip plans"])
    assert (created.status_code, created.json()["title"]) == (201, "t" * 200)
    assert (renamed.status_code, renamed.json()["title"]) == (200, "t" * 200)
    expected = {"detail": 'Send a JSON object like {"title": "Trip plans"}.'}
    assert (not_an_object.status_code, not_an_object.json()) == (400, expected)


async def test_json_nested_too_deeply_gets_400_on_every_path(site: Site) -> None:
    headers = {"Content-Type": "application/json"}
    with site.session(MEMBER) as client, site.session(ADMIN) as admin, httpx.Client(base_url=site.url) as anonymous:
        conversation = client.post("/api/conversations/", json={}).json()
        base = f"/api/conversations/{conversation['id']}/"
        answers = {
            "create": client.post("/api/conversations/", content=NESTED, headers=headers),
            "rename": client.patch(base, content=NESTED, headers=headers),
            "post": client.post(base + "messages/", content=NESTED, headers=headers),
            "login": anonymous.post("/api/auth/login", content=NESTED, headers=headers),
        }
        switch = admin.post("/api/admin/models/switch", content='{"model_id": ' + NESTED + "}", headers=headers)
        async with site.socket(base.replace("/api/conversations/", "/ws/chat/"), client) as socket:
            nested = await socket_reply(socket, json.dumps({"type": "chat.send", "ref": 1}).replace("1}", NESTED + "}"))
            binary = await socket_reply(socket, b"\x00\xff")
            still_open = await socket_reply(socket, json.dumps({"type": "chat.send", "ref": 2, "content": " "}))
    for name, response in answers.items():
        assert (name, response.status_code, response.json()) == (name, 400, TOO_DEEP)
    assert (switch.status_code, switch.json()) == (400, {"detail": 'Send a JSON body like {"model_id": "<model name>"}.'})
    assert nested == binary == {"type": "chat.refused", "ref": None, "detail": MALFORMED}
    assert still_open == {"type": "chat.refused", "ref": 2, "detail": "Type a message before sending."}


def login_form_token(client: httpx.Client) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', client.get("/login/").text)
    assert match
    return match.group(1)


async def test_a_request_the_browser_marks_cross_site_is_refused(site: Site) -> None:
    cross = {"Sec-Fetch-Site": "cross-site"}
    with site.session(MEMBER) as client, site.session(ADMIN) as admin, httpx.Client(base_url=site.url) as anonymous:
        before = client.get("/api/conversations/").json()
        created = client.post("/api/conversations/", json={"title": "Forged"}, headers=cross)
        refreshed = admin.post("/api/admin/models/refresh", headers=cross)
        api_login = anonymous.post("/api/auth/login", json={"username": MEMBER[0], "password": MEMBER[1]}, headers=cross)
        form = {"username": MEMBER[0], "password": MEMBER[1], "csrfmiddlewaretoken": login_form_token(anonymous)}
        page_login = anonymous.post("/login/", data=form, headers=cross)
        assert "session_id" not in anonymous.cookies
        conversation = client.post("/api/conversations/", json={}).json()
        url = "ws" + site.url.removeprefix("http") + f"/ws/chat/{conversation['id']}/"
        cookie = {"Cookie": f"session_id={client.cookies['session_id']}", **cross}
        # A socket the browser marks cross-site is refused at the handshake, as one from another origin.
        with pytest.raises(InvalidStatus) as socket_refused:
            async with connect(url, origin=Origin(site.url), additional_headers=cookie, proxy=None) as socket:
                await socket.send(json.dumps({"type": "chat.send", "ref": 1, "content": "Hello"}))
        same_origin = client.post(
            "/api/conversations/",
            json={"title": "From the page"},
            headers={"Sec-Fetch-Site": "same-origin", "Origin": site.url, "X-CSRFToken": client.cookies["csrftoken"]},
        )
        after = client.get("/api/conversations/").json()
    assert (created.status_code, created.json()) == (403, CROSS_SITE)
    assert (refreshed.status_code, refreshed.json()) == (403, CROSS_SITE)
    assert (api_login.status_code, api_login.json()) == (403, CROSS_SITE)
    assert page_login.status_code == 403 and CROSS_SITE["detail"] in page_login.text
    assert socket_refused.value.response.status_code == 403
    assert same_origin.status_code == 201
    assert [c["title"] for c in after] == ["From the page", "New conversation"] + [c["title"] for c in before]


def test_an_admin_post_with_a_body_must_send_it_as_json(site: Site) -> None:
    body = json.dumps({"model_id": "Tiny-Chat-5M"})
    expected = {"detail": "Send the body as JSON, with the header Content-Type: application/json."}
    with site.session(ADMIN) as admin:
        as_text = admin.post("/api/admin/models/switch", content=body, headers={"Content-Type": "text/plain"})
        as_form = admin.post("/api/admin/models/switch", data={"model_id": "Tiny-Chat-5M"})
        refresh_as_text = admin.post("/api/admin/models/refresh", content="{}", headers={"Content-Type": "text/plain"})
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        as_json = admin.post("/api/admin/models/switch", content=body, headers=json_type)
        without_body = admin.post("/api/admin/models/refresh")  # as the guide's curl sends unload: no body, no type
    for refused in (as_text, as_form, refresh_as_text):
        assert (refused.status_code, refused.json()) == (415, expected)
    assert as_json.status_code == 200, as_json.text  # the model already active: switched at once
    assert without_body.status_code == 200, without_body.text


def test_a_malformed_form_upload_gets_gantrys_own_answer(site: Site) -> None:
    """The web server hands bodies over unparsed: a broken multipart body reaches Gantry, which answers
    it with its sentence, instead of being cut off by a bare 400 of the HTTP layer."""
    expected = {"detail": "Send the body as JSON, with the header Content-Type: application/json."}
    broken = {"Content-Type": "multipart/form-data; boundary=gantry"}
    with site.session(ADMIN) as admin:
        refused = admin.post("/api/admin/models/switch", content=b"no parts at all", headers=broken)
        api = httpx.post(site.url + "/v1/chat/completions", content=b"--gantry\r\nbroken", headers=broken)
    assert (refused.status_code, refused.json()) == (415, expected)
    assert api.status_code == 401 and api.json()["error"]["code"] == "invalid_api_key"
