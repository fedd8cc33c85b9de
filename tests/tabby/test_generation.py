"""Chat and text completions from the real server with a real demo model, over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from harness.tabby_server import API_KEY, TabbyServer
from tests.tabby.conftest import TINY

HELLO = [{"role": "user", "content": "Write a short note about Python modules."}]


def sse_payloads(text: str) -> list[Any]:
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]" for line in text.split("\r\n") if line.startswith("data: ")]


def openai_client(server: TabbyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def test_the_openai_client_gets_a_non_streamed_answer(tiny_server: TabbyServer) -> None:
    answer = openai_client(tiny_server).chat.completions.create(model=TINY, messages=HELLO, max_tokens=16, seed=1)  # type: ignore[arg-type]
    assert answer.object == "chat.completion"
    assert answer.model == TINY
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens <= 16


def test_the_openai_client_gets_a_streamed_answer_piece_by_piece(tiny_server: TabbyServer) -> None:
    stream = openai_client(tiny_server).chat.completions.create(
        model=TINY, messages=HELLO, max_tokens=24, stream=True, extra_body={"ban_eos_token": True}  # type: ignore[arg-type]
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_max_tokens_ends_the_answer_with_finish_reason_length(tiny_server: TabbyServer) -> None:
    with tiny_server.client() as client:
        body = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5, "ban_eos_token": True}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_a_stop_string_ends_the_answer(tiny_server: TabbyServer) -> None:
    greedy = {"messages": HELLO, "max_tokens": 40, "temperature": 0, "ban_eos_token": True}
    with tiny_server.client() as client:
        full = client.post("/v1/chat/completions", json=greedy).json()["choices"][0]["message"]["content"]
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        assert stop.strip(), full
        cut = client.post("/v1/chat/completions", json={**greedy, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["stop_str"] == stop
    assert cut["message"]["content"] == full[: full.index(stop)]


def test_include_usage_puts_usage_on_the_last_chunk(tiny_server: TabbyServer) -> None:
    body = {"messages": HELLO, "max_tokens": 7, "stream": True, "ban_eos_token": True, "stream_options": {"include_usage": True}}
    with tiny_server.client() as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 7
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 7
    assert all("usage" not in e for e in events[:-2])


def test_text_completions_stream_too(tiny_server: TabbyServer) -> None:
    with tiny_server.client() as client:
        plain = client.post("/v1/completions", json={"prompt": "def main():", "max_tokens": 6, "ban_eos_token": True}).json()
        streamed = client.post("/v1/completions", json={"prompt": "def main():", "max_tokens": 6, "stream": True}).text
    assert plain["object"] == "text_completion" and plain["choices"][0]["finish_reason"] == "length"
    assert sse_payloads(streamed)[-1] == "[DONE]"


def test_the_same_seed_gives_the_same_answer(tiny_server: TabbyServer) -> None:
    body = {"messages": HELLO, "max_tokens": 12, "seed": 42, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "min_p": 0.01}
    with tiny_server.client() as client:
        first, second = (client.post("/v1/chat/completions", json=body).json() for _ in range(2))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_tokens_encode_and_decode_round_trip(tiny_server: TabbyServer) -> None:
    with tiny_server.client() as client:
        encoded = client.post("/v1/token/encode", json={"text": "héllo <|im_start|>", "add_bos_token": False}).json()
        decoded = client.post("/v1/token/decode", json={"tokens": encoded["tokens"]}).json()
    assert encoded["length"] == len(encoded["tokens"])
    assert decoded["text"] == "héllo <|im_start|>"


async def test_eight_simultaneous_streams_all_finish_with_their_token_counts(tiny_server: TabbyServer) -> None:
    async def one(client: httpx.AsyncClient, n: int) -> tuple[int, int, int]:
        body = {"messages": HELLO, "max_tokens": n, "stream": True, "ban_eos_token": True, "stream_options": {"include_usage": True}}
        pieces = 0
        usage: dict[str, Any] = {}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    pieces += bool(event["choices"][0]["delta"].get("content"))
                    usage = event.get("usage") or usage
        return n, usage["completion_tokens"], pieces

    async with httpx.AsyncClient(base_url=tiny_server.url, headers=tiny_server.headers(), timeout=120) as client:
        results = await asyncio.gather(*(one(client, 20 + i) for i in range(8)))
    for requested, got, pieces in results:
        assert got == requested
        assert pieces >= 2


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"messages": [', 422),
        (json.dumps({"messages": HELLO, "max_tokens": 0}).encode(), 422),
        (json.dumps({"messages": HELLO, "max_tokens": -3}).encode(), 422),
        (json.dumps({"max_tokens": 3}).encode(), 422),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_server_stays_healthy(tiny_server: TabbyServer, body: bytes, status: int) -> None:
    with tiny_server.client() as client:
        response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert response.json()["detail"]
        assert client.get("/health").json() == {"status": "healthy", "issues": []}


def test_a_prompt_longer_than_the_context_gets_openais_context_length_error(tiny_server: TabbyServer) -> None:
    long_prompt = "many words " * 3000
    with tiny_server.client() as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_prompt}], "stream": True})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert "maximum context length is 2048 tokens" in error["message"]
        assert client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).status_code == 200
