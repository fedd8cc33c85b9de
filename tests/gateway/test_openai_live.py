"""The official `openai` client, with a personal key, against the live site (daphne) and the real model
server on loopback: models, chat and text completions, streamed and not, with usage, stop and sampling
fields; the same answers TabbyAPI itself gives; keys that no longer open it; requests that leave nothing
behind, also when their caller goes away."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest

from harness.site import MEMBER, OUTSIDER, Site
from harness.tabby_server import TabbyServer
from tests.gateway.live import make_key, openai_client
from tests.models_admin.live import query, wait_until

TINY = "Tiny-Chat-5M"
QUESTION = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a color."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12, "extra_body": {"top_k": 1}}  # top_k: a TabbyAPI field
SAME = {"temperature": 0, "max_tokens": 12, "top_k": 1}  # the same fields, sent to TabbyAPI itself


@pytest.fixture(scope="module")
def member_key(site: Site) -> str:
    return make_key(site, MEMBER)[1]


def tabby_answer(tabby: TabbyServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """What TabbyAPI itself answers to the same request (not streamed)."""
    response = httpx.post(tabby.url + path, json=body, headers=tabby.headers(), timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def api_rows(site: Site) -> list[dict[str, Any]]:
    return query(site, "SELECT id FROM chat_conversation WHERE source = 'api'")


def test_models_lists_the_model_chat_answers_with(site: Site, member_key: str) -> None:
    assert [model.id for model in openai_client(site, member_key).models.list()] == [TINY]


def test_a_chat_completion_is_tabbys_answer_streamed_or_not(site: Site, tabby: TabbyServer, member_key: str) -> None:
    client = openai_client(site, member_key)
    whole = client.chat.completions.create(model=TINY, messages=QUESTION, **GREEDY)  # type: ignore[arg-type]
    direct = tabby_answer(tabby, "/v1/chat/completions", {"messages": QUESTION, **SAME})
    text = whole.choices[0].message.content
    assert text and text == direct["choices"][0]["message"]["content"]
    assert whole.model == TINY and whole.object == "chat.completion"
    assert whole.choices[0].finish_reason == direct["choices"][0]["finish_reason"]
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        direct["usage"]["prompt_tokens"],
        direct["usage"]["completion_tokens"],
    )

    chunks = list(
        client.chat.completions.create(
            model=TINY, messages=QUESTION, stream=True, stream_options={"include_usage": True}, **GREEDY  # type: ignore[arg-type]
        )
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "the answer came in pieces"
    assert "".join(pieces) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert {c.model for c in chunks} == {TINY}
    wait_until(lambda: not api_rows(site), 10, "the requests' rows to be gone")


def test_stop_and_max_tokens_reach_the_model(site: Site, member_key: str) -> None:
    client = openai_client(site, member_key)
    whole = client.chat.completions.create(model=TINY, messages=QUESTION, **GREEDY)  # type: ignore[arg-type]
    text = whole.choices[0].message.content or ""
    assert len(text) > 6
    stop = text[4:6]
    stopped = client.chat.completions.create(model=TINY, messages=QUESTION, stop=[stop], **GREEDY)  # type: ignore[arg-type]
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=TINY, messages=QUESTION, **{**GREEDY, "max_tokens": 2})  # type: ignore[arg-type]
    assert short.usage is not None and short.usage.completion_tokens <= 2
    assert short.choices[0].finish_reason == "length"


def test_a_text_completion_streamed_or_not(site: Site, tabby: TabbyServer, member_key: str) -> None:
    client = openai_client(site, member_key)
    whole = client.completions.create(model=TINY, prompt="Once upon a time", **GREEDY)
    direct = tabby_answer(tabby, "/v1/completions", {"prompt": "Once upon a time", **SAME})
    assert whole.choices[0].text == direct["choices"][0]["text"] and whole.object == "text_completion"
    streamed = list(client.completions.create(model=TINY, prompt="Once upon a time", stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_a_revoked_key_gets_401_in_openais_shape(site: Site) -> None:
    key_id, key = make_key(site, MEMBER, "to revoke")
    client = openai_client(site, key)
    assert client.models.list().data
    with site.session(MEMBER) as session:
        assert session.delete(f"/api/keys/{key_id}/").status_code == 204
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model=TINY, messages=QUESTION)  # type: ignore[arg-type]
    assert refused.value.status_code == 401
    error = refused.value.response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error" and "revoked" in error["message"]


def test_another_users_key_cannot_see_the_first_users_conversations(site: Site, member_key: str) -> None:
    with site.session(MEMBER) as session:
        mine = session.post("/api/conversations/", json={"title": "Private plans"}).json()
        assert session.post(f"/api/conversations/{mine['id']}/messages/", json={"content": "Hello"}).status_code == 202
    outsider_key = make_key(site, OUTSIDER)[1]
    headers = {"Authorization": f"Bearer {outsider_key}"}
    for path in ("/api/conversations/", f"/api/conversations/{mine['id']}/", f"/api/conversations/{mine['id']}/messages/"):
        response = httpx.get(site.url + path, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert "Private plans" not in response.text and "Hello" not in response.text
    # The outsider's requests are their own: nothing of the member's conversation reaches the model.
    answer = openai_client(site, outsider_key).chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "What did I say before?"}], **GREEDY
    )
    assert answer.choices[0].message.content is not None
    # An API request is no conversation of the chat pages.
    openai_client(site, member_key).chat.completions.create(model=TINY, messages=QUESTION, **GREEDY)  # type: ignore[arg-type]
    with site.session(MEMBER) as session:
        assert [c["title"] for c in session.get("/api/conversations/").json()] == ["Private plans"]
    ended = "SELECT id FROM chat_message WHERE conversation_id = ? AND status IN ('generating', 'queued')"
    wait_until(lambda: not query(site, ended, mine["id"]), 60, "the member's answer to end")


def test_a_caller_who_goes_away_leaves_nothing_running(site: Site, member_key: str) -> None:
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True, "max_tokens": 512, "temperature": 1}
    with httpx.stream("POST", site.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {member_key}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"content"' in first
        rows = api_rows(site)
        assert len(rows) == 1  # the request is a conversation while it runs
    started = time.monotonic()
    wait_until(lambda: not api_rows(site), 10, "the request's rows to be deleted once its caller went away")
    # Nothing is being answered any more (the rows went with the conversation; none is left behind).
    assert query(site, "SELECT id FROM chat_message WHERE status IN ('generating', 'queued')") == []
    assert time.monotonic() - started < 5
