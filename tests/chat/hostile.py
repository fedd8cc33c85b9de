"""What hostile clients send, for the tests of the embedded site and of the production stack."""

from __future__ import annotations

import json
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection

from harness.site import Site, receive_until

UNSTORABLE = (
    "This text has a character that cannot be stored (a NUL character or half of a surrogate pair). "
    "Remove it and send again."
)
# A NUL, a lone high surrogate and a lone low surrogate, as JSON escapes them (\u0000, \ud800, \udfff).
UNSTORABLE_TEXTS = ["Hello\x00world", "Hello \ud800 world", "\udfff"]


def raw_json(client: httpx.Client, method: str, path: str, value: Any, **headers: str) -> httpx.Response:
    """Send `value` as JSON the way any client may: json.dumps escapes what UTF-8 cannot carry."""
    headers = {"Content-Type": "application/json", **headers}
    return client.request(method, path, content=json.dumps(value).encode(), headers=headers)


def is_reply(event: dict[str, Any]) -> bool:
    return event["type"] in {"chat.sent", "chat.refused"}


async def socket_reply(socket: ClientConnection, frame: str | bytes) -> dict[str, Any]:
    await socket.send(frame)
    return (await receive_until(socket, is_reply))[-1]


async def unstorable_text_everywhere(site: Site, client: httpx.Client) -> dict[str, list[Any]]:
    """Send every unstorable text by every path (new conversation's title, rename, POST, the socket);
    returns the answers by path, and checks nothing was saved."""
    conversation = client.post("/api/conversations/", json={"title": "Keep me"}).json()
    base = f"/api/conversations/{conversation['id']}/"
    answers: dict[str, list[Any]] = {"create": [], "rename": [], "post": [], "socket": []}
    async with site.socket(f"/ws/chat/{conversation['id']}/", client) as socket:
        for text in UNSTORABLE_TEXTS:
            answers["create"].append(raw_json(client, "POST", "/api/conversations/", {"title": text}))
            answers["rename"].append(raw_json(client, "PATCH", base, {"title": text}))
            answers["post"].append(raw_json(client, "POST", base + "messages/", {"content": text}))
            answers["socket"].append(await socket_reply(socket, json.dumps({"type": "chat.send", "ref": 1, "content": text})))
    assert client.get(base).json()["title"] == "Keep me"
    assert client.get(base + "messages/").json() == []
    return answers


def assert_refused_alike(answers: dict[str, list[Any]]) -> None:
    for path in ("create", "rename", "post"):
        for response in answers[path]:
            assert (path, response.status_code, response.json()) == (path, 400, {"detail": UNSTORABLE})
    assert answers["socket"] == [{"type": "chat.refused", "ref": 1, "detail": UNSTORABLE}] * len(UNSTORABLE_TEXTS)
