"""Shared by the live tests of the OpenAI-compatible API: a personal key made through the keys API."""

from __future__ import annotations

import openai

from harness.site import Site


def make_key(site: Site, user: tuple[str, str], name: str = "tests") -> tuple[int, str]:
    with site.session(user) as client:
        response = client.post("/api/keys", json={"name": name})
        assert response.status_code == 201, response.text
        body = response.json()
        return int(body["id"]), str(body["key"])


def openai_client(site: Site, key: str, timeout: float = 120) -> openai.OpenAI:
    return openai.OpenAI(base_url=site.url + "/v1", api_key=key, timeout=timeout, max_retries=0)
