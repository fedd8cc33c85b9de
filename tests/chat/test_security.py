"""Who may see and do what on the live site: logins, other people's conversations, cross-site requests."""

from __future__ import annotations

import re
import time
from http.cookies import SimpleCookie
from typing import Any

import httpx

from harness.site import MEMBER, OUTSIDER, Site

EVIL = "http://evil.example"


def anonymous(site: Site) -> httpx.Client:
    return httpx.Client(base_url=site.url, timeout=60)


def answered_conversation(client: httpx.Client) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    conversation = client.post("/api/conversations/", json={"title": "Private"}).json()
    client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": "My secret"})
    deadline = time.monotonic() + 60
    while True:
        messages = client.get(f"/api/conversations/{conversation['id']}/messages/").json()
        if len(messages) == 2 and all(m["status"] == "done" for m in messages):
            return conversation, messages
        assert time.monotonic() < deadline, messages
        time.sleep(0.1)


def login_form(client: httpx.Client) -> str:
    """Open the login page like a browser does; returns the form's CSRF token."""
    page = client.get("/login/")
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


def test_an_anonymous_visitor_is_sent_to_the_login_page(site: Site) -> None:
    with anonymous(site) as client:
        response = client.get("/")
    assert response.status_code == 302
    assert response.headers["location"] == "/login/?next=/"


def test_anonymous_api_calls_get_401_with_a_sentence(site: Site) -> None:
    with anonymous(site) as client:
        responses = [
            client.get("/api/conversations/"),
            client.post("/api/conversations/", json={}),
            client.get("/api/conversations/1/messages/"),
            client.post("/api/conversations/1/messages/", json={"content": "Hello"}),
            client.post("/api/messages/1/stop/"),
            client.post("/api/messages/1/retry/"),
        ]
    for response in responses:
        assert response.status_code == 401, (response.request.url, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.json()["detail"].endswith(".")


def test_an_outsider_gets_404_for_a_members_conversation(site: Site) -> None:
    with site.session(MEMBER) as member, site.session(OUTSIDER) as outsider:
        conversation, (question, answer) = answered_conversation(member)
        base = f"/api/conversations/{conversation['id']}/"
        refused = {
            "page": outsider.get(f"/c/{conversation['id']}/"),
            "detail": outsider.get(base),
            "rename": outsider.patch(base, json={"title": "Mine now"}),
            "delete": outsider.delete(base),
            "messages": outsider.get(base + "messages/"),
            "post": outsider.post(base + "messages/", json={"content": "Hi"}),
            "stop": outsider.post(f"/api/messages/{question['id']}/stop/"),
            "retry": outsider.post(f"/api/messages/{question['id']}/retry/"),
            "stop answer": outsider.post(f"/api/messages/{answer['id']}/stop/"),
        }
        listed = outsider.get("/api/conversations/").json()
        own_page = member.get(f"/c/{conversation['id']}/")
        after = member.get(base).json(), member.get(base + "messages/").json()
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 404)
    assert conversation["id"] not in [c["id"] for c in listed]
    assert own_page.status_code == 200
    assert after[0]["title"] == "Private"
    assert after[1] == [question, answer]


def test_a_cross_site_post_is_refused_for_a_logged_in_user(site: Site) -> None:
    with site.session(MEMBER) as client:
        before = client.get("/api/conversations/").json()
        refused = client.post("/api/conversations/", json={"title": "Forged"}, headers={"Origin": EVIL})
        after = client.get("/api/conversations/").json()
    assert refused.status_code == 403
    assert refused.json() == {"detail": "Cross-site requests are refused."}
    assert after == before


def test_a_cross_site_login_is_refused(site: Site) -> None:
    with anonymous(site) as client:
        api = client.post("/api/auth/login", json={"username": MEMBER[0], "password": MEMBER[1]}, headers={"Origin": EVIL})
        token = login_form(client)
        page = client.post(
            "/login/",
            data={"username": MEMBER[0], "password": MEMBER[1], "csrfmiddlewaretoken": token},
            headers={"Origin": EVIL},
        )
        assert "session_id" not in client.cookies
    assert api.status_code == 403
    assert api.json() == {"detail": "Cross-site requests are refused."}
    assert page.status_code == 403


def test_a_script_without_an_origin_needs_no_csrf_token(site: Site) -> None:
    with site.session(MEMBER) as client:
        client.cookies.delete("csrftoken")  # logging in set one; a script has no use for it
        created = client.post("/api/conversations/", json={"title": "From a script"})
    assert created.status_code == 201


def test_a_browser_post_from_the_site_itself_needs_the_csrf_token(site: Site) -> None:
    with site.session(MEMBER) as client:
        client.cookies.delete("csrftoken")
        page = client.get("/")  # the chat page hands its script the CSRF cookie
        assert "csrftoken" in client.cookies
        without = client.post("/api/conversations/", json={"title": "No token"}, headers={"Origin": site.url})
        with_token = client.post(
            "/api/conversations/",
            json={"title": "With token"},
            headers={"Origin": site.url, "X-CSRFToken": client.cookies["csrftoken"]},
        )
        titles = [c["title"] for c in client.get("/api/conversations/").json()]
    assert page.status_code == 200
    assert without.status_code == 403
    assert "CSRF" in without.json()["detail"]
    assert with_token.status_code == 201
    assert "With token" in titles and "No token" not in titles


def test_five_wrong_passwords_lock_the_api_login_even_for_the_right_password(site: Site) -> None:
    site.manage("ensure_user", "locked-api", "--password", "right-password-1")
    with anonymous(site) as client:
        wrong = [client.post("/api/auth/login", json={"username": "locked-api", "password": "guess"}) for _ in range(5)]
        right = client.post("/api/auth/login", json={"username": "locked-api", "password": "right-password-1"})
        assert "session_id" not in client.cookies
    assert [r.status_code for r in wrong] == [400] * 5
    assert wrong[0].json() == {"detail": "Wrong username or password."}
    assert right.status_code == 429
    assert right.json() == {"detail": "Too many wrong passwords for this account. Try again in 5 minutes."}


def test_five_wrong_passwords_lock_the_login_page_even_for_the_right_password(site: Site) -> None:
    site.manage("ensure_user", "locked-page", "--password", "right-password-1")
    with anonymous(site) as client:
        token = login_form(client)
        form = {"username": "locked-page", "csrfmiddlewaretoken": token}
        wrong = [client.post("/login/", data={**form, "password": "guess"}) for _ in range(5)]
        right = client.post("/login/", data={**form, "password": "right-password-1"})
        assert "session_id" not in client.cookies
    assert [r.status_code for r in wrong] == [400] * 5
    assert "Wrong username or password." in wrong[0].text
    assert right.status_code == 429
    assert "Too many wrong passwords for this account. Try again in 5 minutes." in right.text


def test_the_session_cookie_is_http_only_and_same_site_lax(site: Site) -> None:
    with anonymous(site) as client:
        response = client.post("/api/auth/login", json={"username": MEMBER[0], "password": MEMBER[1]})
    cookies: SimpleCookie = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        cookies.load(header)
    session = cookies["session_id"]
    assert session.value
    assert session["httponly"] is True
    assert session["samesite"] == "Lax"
