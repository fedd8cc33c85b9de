"""The TabbyAPI client against the bytes the real TabbyAPI server sent.

The recorded exchanges (`shared/contracts/tabbyapi-recorded/NN-*.json`) are served through
httpx.MockTransport, the one fake allowed: the recorded status, headers and exact body, chunk by chunk
where the recording kept the HTTP chunks. Successful load and chat streams could not be recorded (no
model loads on a CPU), so they are built from the contract's documented text and cut at awkward places
(mid-line, between CR and LF, mid-character). Unreachable servers are real closed or silent sockets.
The admin calls block and an answer streams on the event loop (`open_chat`), as their callers use them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.tabby_server import ADMIN_KEY, API_KEY, TabbyServer
from models_admin.tabby_client import REST_TIMEOUT, TabbyClient, TabbyConfig
from models_admin.tabby_errors import (
    BackendAuthError,
    BackendBadResponse,
    BackendError,
    BackendUnavailable,
    GenerationFailed,
    ModelLoadFailed,
    NoModelLoaded,
)
from models_admin.tabby_sse import ChatDelta, Usage

# Where the recordings are: `shared/` sits beside the repository checkout.
CONTRACTS_ENV = "GANTRY_CONTRACTS_DIR"
CONTRACTS_DIR = Path(os.environ.get(CONTRACTS_ENV) or Path(__file__).resolve().parents[2].parent / "shared" / "contracts")
RECORDINGS_DIR = CONTRACTS_DIR / "tabbyapi-recorded"
MISSING = (
    f"No recorded TabbyAPI exchanges (NN-*.json) found in {RECORDINGS_DIR}. They belong in "
    f"shared/contracts/tabbyapi-recorded beside the repository checkout; set {CONTRACTS_ENV} to the "
    "'contracts' folder if they are elsewhere."
)

CONFIG = TabbyConfig(base_url="http://tabby.test:5055", api_key="test-api-key", admin_key="test-admin-key")
# Framing headers describe the recorded connection, not the body served here.
TRANSPORT_HEADERS = {"content-length", "transfer-encoding", "connection"}
PING = ": ping - 2026-11-23 12:00:15.000000+00:00\r\n\r\n"
HELLO = [{"role": "user", "content": "Hello"}]


# The recordings


def recording(number: int) -> dict[str, Any]:
    found = sorted(RECORDINGS_DIR.glob(f"{number:02d}-*.json"))
    if not found:
        pytest.fail(MISSING)
    return dict(json.loads(found[0].read_text(encoding="utf-8")))


def what_tabby_said(number: int) -> list[str]:
    """The texts of a recorded failure that the client's sentence must carry."""
    response = recording(number)["response"]
    events = response.get("sse_data_json") or []
    if events:
        return [events[-1]["error"]["message"]]
    detail = (response.get("body_json") or {}).get("detail")
    if isinstance(detail, list):
        return [item["msg"] for item in detail]
    return [detail if isinstance(detail, str) else response["body_raw"]]


def documented_load_stream() -> bytes:
    """The successful load stream written out in the recordings' README (it could not be recorded)."""
    readme = (RECORDINGS_DIR / "README.md").read_text(encoding="utf-8")
    block = re.search(r"An illustrative sequence.*?```\n(.*?)```", readme, re.DOTALL)
    if block is None:
        pytest.fail(f"The documented successful load stream is missing from {RECORDINGS_DIR / 'README.md'}.")
    lines = [re.sub(r"\s{2,}\(.*\)$", "", line) for line in block.group(1).splitlines() if line != "(end of body)"]
    assert all(line.endswith("\\r\\n") for line in lines), "every documented line ends in a written-out CRLF"
    return "".join(line.replace("\\r\\n", "\r\n") for line in lines).encode()


def data_events(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.decode().split("\r\n") if line.startswith("data: ")]


def chat_event(content: str = "", finish_reason: str | None = None, usage: Usage | None = None) -> str:
    """One completion chunk in the shape `contracts/tabbyapi.md` documents (compact JSON, no role delta)."""
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1795436891,
        "model": "Tiny-Chat-5M",
        "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish_reason}],
    }
    if usage:
        chunk["usage"] = usage
    return "data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False) + "\r\n\r\n"


def error_event(message: str) -> str:
    return "data: " + json.dumps({"error": {"message": message, "trace": None}}, separators=(",", ":")) + "\r\n\r\n"


USAGE = Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9)
PIECES = ["Hel", "lo, ", "wörld ✓"]
CHAT_STREAM = (
    "".join(chat_event(piece) for piece in PIECES[:2])
    + PING
    + chat_event(PIECES[2])
    + chat_event("", "stop", USAGE)
    + "data: [DONE]\r\n\r\n"
).encode()


def cut(body: bytes, how: str) -> list[bytes]:
    """The body as HTTP chunks: whole, byte by byte, or cut every 11 bytes and between every CR and LF."""
    if how == "whole":
        return [body]
    if how == "bytes":
        return [body[i : i + 1] for i in range(len(body))]
    cuts = sorted({i + 1 for i, byte in enumerate(body) if byte == ord("\r")} | set(range(11, len(body), 11)))
    return [body[start:end] for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[start:end]]


# The HTTP seam


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body served in given chunks to either client; it counts what was read and sees closing."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.served = 0
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.served += 1
            yield chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.served += 1
            yield chunk

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class Server:
    """Answers every request with one response, and keeps the requests."""

    status: int
    headers: list[tuple[str, str]]
    body: Body
    requests: list[httpx.Request] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, headers=self.headers, stream=self.body)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def sent_json(self) -> Any:
        return json.loads(self.requests[-1].content)


def replaying(number: int) -> Server:
    response = recording(number)["response"]
    headers = [
        (name, value)
        for name, values in response["headers"].items()
        if name not in TRANSPORT_HEADERS
        for value in (values if isinstance(values, list) else [values])
    ]
    chunks = response.get("body_chunks") or [response["body_raw"]]
    return Server(response["status"], headers, Body([chunk.encode() for chunk in chunks]))


def streaming(chunks: list[bytes]) -> Server:
    return Server(200, [("content-type", "text/event-stream; charset=utf-8")], Body(chunks))


async def call(
    transport: httpx.MockTransport | None,
    method: str,
    *args: Any,
    seen: list[Any] | None = None,
    config: TabbyConfig = CONFIG,
    **kwargs: Any,
) -> Any:
    """Call one client method as its callers do; a stream's items land in `seen` as they arrive."""
    seen = [] if seen is None else seen
    if method == "open_chat":
        client = TabbyClient(config, transport=transport)
        try:
            async with client.open_chat(*args, **kwargs) as deltas:
                async for delta in deltas:
                    seen.append(delta)
        finally:
            await client.aclose()
        return seen
    with TabbyClient(config, transport=transport) as client:
        result = getattr(client, method)(*args, **kwargs)
        if not isinstance(result, Iterator):
            return result
        for item in result:
            seen.append(item)
        return seen


async def fails(server: Server, method: str, *args: Any, error: type[BackendError], **kwargs: Any) -> BackendError:
    seen: list[Any] = []
    with pytest.raises(error) as raised:
        await call(server.transport(), method, *args, seen=seen, **kwargs)
    assert seen == [], "nothing is handed over before the failure"
    assert raised.value.message == str(raised.value) and "\n" not in raised.value.message
    return raised.value


# Listing and the current model


async def test_it_lists_every_model_folder_with_the_admin_key() -> None:
    server = replaying(14)
    cards = await call(server.transport(), "list_models")
    assert [card["id"] for card in cards] == ["Llama-3.1-8B-Instruct", "Qwen2.5-Coder-7B-Instruct", "Broken-Model"]
    assert cards[0] == recording(14)["response"]["body_json"]["data"][0]
    request = server.requests[0]
    assert (request.method, request.url.path) == ("GET", "/v1/models")
    assert request.headers["authorization"] == "Bearer test-admin-key"


@pytest.mark.parametrize("number", [24, 25, 64, 83])
async def test_it_reports_no_current_model_while_nothing_is_loaded(number: int) -> None:
    server = replaying(number)
    assert await call(server.transport(), "current_model") is None
    assert server.requests[0].url.path == "/v1/model"


async def test_it_returns_the_card_of_the_loaded_model() -> None:
    card = {
        "id": "Tiny-Chat-5M",
        "object": "model",
        "created": 1,
        "owned_by": "tabbyAPI",
        "logging": None,
        "parameters": {"max_seq_len": 2048, "cache_mode": "FP16"},
    }
    server = Server(200, [("content-type", "application/json")], Body([json.dumps(card).encode()]))
    assert await call(server.transport(), "current_model") == card


# What the admin key may do


@pytest.mark.parametrize("number, permission", [(3, "api"), (4, "admin"), (6, "admin"), (71, "admin")])
async def test_it_asks_tabbyapi_what_the_admin_key_may_do(number: int, permission: str) -> None:
    server = replaying(number)
    assert await call(server.transport(), "admin_key_permission") == permission
    request = server.requests[0]
    assert (request.method, request.url.path) == ("GET", "/v1/auth/permission")
    assert request.headers["authorization"] == "Bearer test-admin-key"


async def test_a_server_without_the_permission_endpoint_cannot_say() -> None:
    assert await call(replaying(59).transport(), "admin_key_permission") is None


@pytest.mark.parametrize("number", [9, 10])
async def test_a_refused_admin_key_is_an_auth_error_that_says_which_setting_to_fix(number: int) -> None:
    config = TabbyConfig(CONFIG.base_url, "test-api-key", "wrong-key", admin_key_fix="set TABBY_ADMIN_KEY to the admin_key")
    error = await fails(replaying(number), "admin_key_permission", error=BackendAuthError, config=config)
    assert isinstance(error, BackendAuthError) and (error.status, error.key) == (401, "admin")
    assert error.message == f"TabbyAPI refused Gantry's admin key ({what_tabby_said(number)[0]}); set TABBY_ADMIN_KEY to the admin_key."


async def test_a_refused_api_key_names_the_api_key_setting() -> None:
    config = TabbyConfig(CONFIG.base_url, "", "test-admin-key", api_key_fix="set TABBY_API_KEY to an api_key")
    error = await fails(replaying(49), "open_chat", HELLO, error=BackendAuthError, config=config)
    assert isinstance(error, BackendAuthError) and error.key == "api"
    assert error.message == "TabbyAPI refused Gantry's API key (Please provide an API key); set TABBY_API_KEY to an api_key."


# Loading


@pytest.mark.parametrize(
    "number, model", [(31, "Broken-Model"), (32, "Llama-3.1-8B-Instruct"), (34, "Qwen2.5-Coder-7B-Instruct")]
)
async def test_it_reads_the_error_event_of_a_broken_model_load(number: int, model: str) -> None:
    error = await fails(replaying(number), "load", model, error=ModelLoadFailed)
    assert model in error.message and what_tabby_said(number)[0] in error.message
    assert error.status is None


async def test_it_skips_the_pings_of_a_slow_load_and_then_reads_its_error() -> None:
    server = replaying(80)
    assert len(server.body.chunks) == 4 and server.body.chunks[0].startswith(b": ping - ")
    error = await fails(server, "load", "Slow-Model", error=ModelLoadFailed)
    assert what_tabby_said(80)[0] in error.message


@pytest.mark.parametrize("number", [29, 30])
async def test_it_turns_a_refused_load_into_tabbys_sentence(number: int) -> None:
    error = await fails(replaying(number), "load", "Does-Not-Exist", error=BackendBadResponse)
    assert error.status == 400 and what_tabby_said(number)[0] in error.message


@pytest.mark.parametrize("number", [28, 40, 41])
async def test_it_turns_a_validation_list_into_one_sentence(number: int) -> None:
    error = await fails(replaying(number), "load", "X", error=BackendBadResponse)
    assert error.status == 422
    assert all(said in error.message for said in what_tabby_said(number))
    assert not any(mark in error.message for mark in "[{") and error.message.endswith(".")


@pytest.mark.parametrize("number", [35, 37, 39])
async def test_it_raises_an_auth_error_when_the_admin_key_is_refused(number: int) -> None:
    error = await fails(replaying(number), "load", "Llama-3.1-8B-Instruct", error=BackendAuthError)
    assert error.status == 401 and what_tabby_said(number)[0] in error.message and "admin key" in error.message


@pytest.mark.parametrize("how", ["whole", "bytes", "odd"])
async def test_it_yields_load_progress_in_order_until_the_model_finishes(how: str) -> None:
    body = documented_load_stream()
    server = streaming(cut(body, how))
    progress = await call(server.transport(), "load", "Qwen2.5-Coder-7B-Instruct", max_seq_len=4096)
    assert progress == data_events(body)
    assert {"model_type": "draft", "module": 2, "modules": 2, "status": "finished"} in progress[:-1]
    assert progress[-1] == {"model_type": "model", "module": 4, "modules": 4, "status": "finished"}
    request = server.requests[0]
    assert (request.method, request.url.path) == ("POST", "/v1/model/load")
    assert request.headers["authorization"] == "Bearer test-admin-key" and "x-api-key" not in request.headers
    assert server.sent_json() == {"model_name": "Qwen2.5-Coder-7B-Instruct", "max_seq_len": 4096}


async def test_it_completes_a_load_of_the_model_already_loaded() -> None:
    events = [{"model_type": "model", "module": 1, "modules": 1, "status": status} for status in ("processing", "finished")]
    body = "".join(f"data: {json.dumps(e, separators=(',', ':'))}\r\n\r\n" for e in events).encode()
    assert await call(streaming([body]).transport(), "load", "Tiny-Chat-5M") == events


@pytest.mark.parametrize("how", ["whole", "odd"])
async def test_it_stops_reading_at_the_final_finished_event(how: str) -> None:
    body = documented_load_stream() + b"data: not an event\r\n\r\n" * 3
    server = streaming(cut(body, how))
    progress = await call(server.transport(), "load", "Qwen2.5-Coder-7B-Instruct")
    assert progress == data_events(documented_load_stream())
    if how == "odd":
        assert server.body.served < len(server.body.chunks), "the chunks after the final event were never read"


@pytest.mark.parametrize("last", [("model", 4, 4, "processing"), ("draft", 2, 2, "finished")])
async def test_it_fails_a_load_whose_stream_closes_before_the_model_finishes(last: tuple[str, int, int, str]) -> None:
    event = json.dumps(dict(zip(("model_type", "module", "modules", "status"), last, strict=True)), separators=(",", ":"))
    full = documented_load_stream()
    body = full[: full.index(event.encode()) + len(event) + len(b"\r\n\r\n")]
    seen: list[Any] = []
    with pytest.raises(ModelLoadFailed, match="stopped before it finished"):
        await call(streaming(cut(body, "odd")).transport(), "load", "Qwen2.5-Coder-7B-Instruct", seen=seen)
    assert seen == data_events(body) and seen[-1]["status"] == last[3]


@pytest.mark.parametrize("how", ["whole", "bytes"])
async def test_it_fails_a_load_that_errors_after_some_progress(how: str) -> None:
    events = data_events(documented_load_stream())[:4]
    body = "".join(f"data: {json.dumps(e)}\r\n\r\n{PING}" for e in events) + error_event("Out of memory on device 0")
    seen: list[Any] = []
    with pytest.raises(ModelLoadFailed, match="Out of memory on device 0"):
        await call(streaming(cut(body.encode(), how)).transport(), "load", "Qwen2.5-Coder-7B-Instruct", seen=seen)
    assert seen == events


async def test_it_rejects_a_load_answered_without_a_stream() -> None:
    server = Server(200, [("content-type", "application/json")], Body([b'{"status":"ok"}']))
    await fails(server, "load", "Tiny-Chat-5M", error=BackendBadResponse)


# Unloading


@pytest.mark.parametrize("number", [42, 44, 86])
async def test_it_raises_no_model_loaded_when_unloading_nothing(number: int) -> None:
    server = replaying(number)
    error = await fails(server, "unload", error=NoModelLoaded)
    assert error.status == 503
    assert (server.requests[0].method, server.requests[0].url.path) == ("POST", "/v1/model/unload")


async def test_it_unloads_the_model() -> None:
    server = Server(200, [("content-type", "application/json")], Body([b"null"]))
    assert await call(server.transport(), "unload") is None


async def test_it_understands_the_400_older_servers_sent_while_nothing_was_loaded() -> None:
    server = Server(400, [("content-type", "application/json")], Body([b'{"detail":"No models are currently loaded."}']))
    assert (await fails(server, "unload", error=NoModelLoaded)).status == 400


# Chatting


@pytest.mark.parametrize("how", ["whole", "bytes", "odd"])
async def test_it_streams_chat_pieces_then_the_finish_reason_with_usage(how: str) -> None:
    server = streaming(cut(CHAT_STREAM, how))
    deltas = await call(server.transport(), "open_chat", HELLO, max_tokens=16)
    assert [delta.text for delta in deltas] == [*PIECES, ""]
    assert deltas[-1] == ChatDelta(text="", finish_reason="stop", usage=USAGE, model="Tiny-Chat-5M")
    assert all(delta.finish_reason is None and delta.usage is None for delta in deltas[:-1])
    request = server.requests[0]
    assert (request.method, request.url.path) == ("POST", "/v1/chat/completions")
    assert request.headers["x-api-key"] == "test-api-key" and "authorization" not in request.headers
    assert server.sent_json() == {"messages": HELLO, "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("how", ["whole", "odd"])
async def test_it_raises_generation_failed_after_the_pieces_before_an_error_event(how: str) -> None:
    body = (chat_event("Hel") + chat_event("lo") + error_event("Generation was cancelled.")).encode()
    seen: list[Any] = []
    with pytest.raises(GenerationFailed, match="Generation was cancelled."):
        await call(streaming(cut(body, how)).transport(), "open_chat", HELLO, seen=seen)
    assert [delta.text for delta in seen] == ["Hel", "lo"]


async def test_it_fails_an_answer_whose_stream_closes_early() -> None:
    seen: list[Any] = []
    with pytest.raises(GenerationFailed, match="before the answer was complete"):
        await call(streaming([chat_event("Hel").encode()]).transport(), "open_chat", HELLO, seen=seen)
    assert [delta.text for delta in seen] == ["Hel"]


@pytest.mark.parametrize("number", [45, 46, 85, 96])
async def test_it_raises_no_model_loaded_when_chatting_with_nothing_loaded(number: int) -> None:
    assert (await fails(replaying(number), "open_chat", HELLO, error=NoModelLoaded)).status == 503


@pytest.mark.parametrize("number", [47, 48])
async def test_it_reports_tabbys_plain_text_500(number: int) -> None:
    error = await fails(
        replaying(number), "open_chat", HELLO, model="Qwen2.5-Coder-7B-Instruct", error=BackendBadResponse
    )
    assert error.status == 500 and "Internal Server Error" in error.message


async def test_closing_the_chat_stream_closes_the_response() -> None:
    server = streaming(cut(CHAT_STREAM, "odd"))
    client = TabbyClient(CONFIG, transport=server.transport())
    async with client.open_chat(HELLO) as deltas:
        assert (await anext(deltas)).text == "Hel"
    assert server.body.closed
    await client.aclose()
    assert server.body.served < len(server.body.chunks), "the rest of the answer was never read"


# Wrong servers and no server


async def test_it_reports_an_address_that_is_not_tabby() -> None:
    error = await fails(replaying(59), "list_models", error=BackendBadResponse)
    assert error.status == 404 and "Not Found" in error.message


def real(url: str) -> TabbyConfig:
    return TabbyConfig(base_url=url, api_key="k", admin_key="k", connect_timeout=2, read_timeout=0.5)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel does) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


METHODS = [("list_models", ()), ("current_model", ()), ("unload", ()), ("load", ("Tiny-Chat-5M",)), ("open_chat", (HELLO,))]


@pytest.mark.parametrize("method, args", METHODS)
async def test_it_reports_a_refused_connection_as_unavailable(method: str, args: tuple[Any, ...]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(BackendUnavailable) as raised:
        await call(None, method, *args, config=real(url))
    assert raised.value.message == f"TabbyAPI at {url} cannot be reached. Check that it is running and that the address is right."
    assert raised.value.status is None


@pytest.mark.parametrize("method, args", METHODS)
async def test_it_reports_a_server_that_never_answers_as_unavailable(
    silent_port: int, method: str, args: tuple[Any, ...]
) -> None:
    with pytest.raises(BackendUnavailable, match="stopped answering .* nothing came for 0.5 seconds"):
        await call(None, method, *args, config=real(f"http://127.0.0.1:{silent_port}"))


async def test_an_opened_chat_is_entered_before_any_piece_is_read_and_closes_with_its_block() -> None:
    server = streaming(cut(CHAT_STREAM, "odd"))
    client = TabbyClient(CONFIG, transport=server.transport())
    async with client.open_chat(HELLO, max_tokens=16) as deltas:
        read_on_entry = server.body.served
        assert (await anext(deltas)).text == "Hel"
    assert server.body.closed
    await client.aclose()
    assert read_on_entry == 0  # entered on the answer's headers: the caller can act before the first piece
    assert server.sent_json()["max_tokens"] == 16 and server.sent_json()["stream"] is True


async def test_an_opened_chat_refused_by_tabby_raises_on_entry() -> None:
    client = TabbyClient(CONFIG, transport=replaying(46).transport())
    with pytest.raises(NoModelLoaded):
        async with client.open_chat(HELLO):
            raise AssertionError("a refused answer has no stream to read")
    await client.aclose()


async def batches_of(reads: list[bytes], seen: list[list[str]]) -> None:
    client = TabbyClient(CONFIG, transport=streaming(reads).transport())
    try:
        async with client.open_chat_batches(HELLO) as batches:
            async for batch in batches:
                seen.append([delta.text for delta in batch])
    finally:
        await client.aclose()


async def test_an_answers_pieces_that_came_in_one_read_come_together_in_order() -> None:
    reads = [
        (chat_event(PIECES[0]) + chat_event(PIECES[1])).encode(),
        chat_event(PIECES[2]).encode()[:7],  # an event cut between two reads
        chat_event(PIECES[2]).encode()[7:] + (chat_event("", "stop", USAGE) + "data: [DONE]\r\n\r\n").encode(),
    ]
    seen: list[list[str]] = []
    await batches_of(reads, seen)
    assert seen == [PIECES[:2], [PIECES[2], ""]]
    assert [text for batch in seen for text in batch] == [d.text for d in await call(streaming(reads).transport(), "open_chat", HELLO)]


async def test_pieces_read_with_an_error_event_are_handed_over_before_the_error() -> None:
    reads = [(chat_event(PIECES[0]) + chat_event(PIECES[1]) + 'data: {"error": {"message": "out of memory"}}\r\n\r\n').encode()]
    seen: list[list[str]] = []
    with pytest.raises(GenerationFailed, match="out of memory"):
        await batches_of(reads, seen)
    assert seen == [PIECES[:2]]


# Connections to the real model server


class PortsSeen(httpx.AsyncBaseTransport):
    """httpx's own transport, noting the local port of the connection each request went out on."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.ports: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.ports.append(response.extensions["network_stream"].get_extra_info("client_addr")[1])
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_answers_in_a_row_go_out_on_one_connection(tabby: TabbyServer) -> None:
    """An answer's response is read to its end after `[DONE]`: its connection goes back to the pool, and
    the next answer's request does not wait for a new one. An answer left early closes its connection."""
    transport = PortsSeen()
    client = TabbyClient(TabbyConfig(base_url=tabby.url, api_key=API_KEY, admin_key=ADMIN_KEY), transport=transport)
    try:
        for _ in range(3):
            async with client.open_chat_batches(HELLO, max_tokens=4) as batches:
                ends = [delta.finish_reason async for batch in batches for delta in batch if delta.finish_reason]
            assert ends in (["stop"], ["length"])
        async with client.open_chat_batches(HELLO, max_tokens=200) as batches:
            await anext(batches)  # left after its first piece (a Stop)
        async with client.open_chat_batches(HELLO, max_tokens=4) as batches:
            assert [delta async for batch in batches for delta in batch]
    finally:
        await client.aclose()
    assert len(transport.ports) == 5
    assert len(set(transport.ports[:4])) == 1  # the three answers, and the one after them
    assert transport.ports[4] != transport.ports[3]  # the one left early took its connection with it


class OpenAfterDone(Body):
    """A server that keeps the response open after `data: [DONE]`."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in super().__aiter__():
            yield chunk
        await asyncio.sleep(30)


async def test_an_answer_ends_at_done_even_when_the_response_stays_open() -> None:
    server = streaming([])
    server.body = OpenAfterDone(cut(CHAT_STREAM, "whole"))
    started = time.monotonic()
    deltas = await call(server.transport(), "open_chat", HELLO)
    assert time.monotonic() - started < REST_TIMEOUT + 1
    assert [delta.text for delta in deltas] == [*PIECES, ""] and deltas[-1].finish_reason == "stop"
    assert server.body.closed  # closed once the wait for its end was over
