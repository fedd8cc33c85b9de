"""The model server answers hostile requests with JSON and the right status, never a plain-text 500,
and lets no page borrow a browser's credentials (the live `python -m tabby serve`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.tabby_server import ADMIN_KEY, TabbyServer, run_tabby

EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def server(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    with run_tabby(tmp_path_factory.mktemp("tabby"), demo_models) as server:
        yield server


def bare(server: TabbyServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30)


@pytest.mark.parametrize(
    ("method", "path", "header", "expected"),
    [
        ("GET", "/v1/models", "x-api-key", "Invalid API key"),
        ("GET", "/v1/models", "authorization", "Invalid API key"),
        ("POST", "/v1/model/unload", "x-admin-key", "Invalid admin key"),
        ("POST", "/v1/model/unload", "authorization", "Invalid admin key"),
        ("GET", "/v1/auth/permission", "x-api-key", "Invalid API key"),
    ],
)
def test_a_key_with_non_ascii_characters_gets_401_json(
    server: TabbyServer, method: str, path: str, header: str, expected: str
) -> None:
    key = "clé-ключ-🔑".encode()
    value = b"Bearer " + key if header == "authorization" else key
    with bare(server) as client:
        response = client.request(method, path, headers={header: value})
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": expected}


@pytest.mark.parametrize(
    "name",
    ["m" * 10_000, "m" * 256, "Tiny\x00Chat", "Tiny-Chat-\ud800"],
    ids=["ten-thousand-characters", "one-past-a-file-name", "nul", "lone-surrogate"],
)
def test_a_model_name_no_folder_can_have_gets_400_json(server: TabbyServer, name: str) -> None:
    with bare(server) as client:
        # json.dumps escapes a lone surrogate as \ud800, as a hostile client would send it.
        body = json.dumps({"model_name": name}).encode()
        headers = {"x-admin-key": ADMIN_KEY, "content-type": "application/json"}
        response = client.post("/v1/model/load", headers=headers, content=body)
        still_serving = client.get("/health")
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"].endswith((".", "?"))
    assert still_serving.status_code == 200


def test_cors_never_reflects_an_origin_together_with_credentials(server: TabbyServer) -> None:
    with bare(server) as client:
        preflight = client.options(
            "/v1/models",
            headers={"Origin": EVIL, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "x-api-key"},
        )
        simple = client.get("/v1/models", headers={"Origin": EVIL, "x-api-key": ADMIN_KEY, "Cookie": "session=1"})
    for response in (preflight, simple):
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers
    assert preflight.headers["access-control-allow-headers"] == "x-api-key"  # a page may still send a key
