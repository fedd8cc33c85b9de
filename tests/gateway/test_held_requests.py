"""Requests of the OpenAI-compatible API wait in chat's queue: during an admin's switch a streamed request
is held, hears the load's progress and its place as SSE comments, and is answered by the new model; a
non-streamed one waits and is answered too. A request held longer than GANTRY_HOLD_TIMEOUT gets 503 with
Retry-After, and the per-user cap of the queue bounds API requests as it bounds chat messages.

The model server is this module's own: it reads weights at half a megabyte a second, so a switch to the
5 MB model (the same weights under a second name) stays in its load for about ten seconds. A second site
points at a port where no model server listens, with a two-second hold timeout and one waiting request
per user.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.site import ADMIN, MEMBER, OUTSIDER, Site, run_site
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.gateway.live import make_key, openai_client
from tests.models_admin.live import query, started_together, wait_until

TINY = "Tiny-Chat-5M"
TINY_V2 = "Tiny-Chat-5M-v2"
ASK = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def servers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TabbyServer, Site, Site]]:
    folder = tmp_path_factory.mktemp("models")
    for name in (TINY, TINY_V2):
        (folder / name).symlink_to(demo_models / TINY, target_is_directory=True)
    config = {"model": {"model_name": TINY, "load_throttle_mbps": 0.5}, "developer": {"cpu_threads": 1}}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    nowhere = f"http://127.0.0.1:{free_port()}"
    strict = {"GANTRY_HOLD_TIMEOUT": "2", "GANTRY_MAX_QUEUED_PER_USER": "1", "TABBY_CHECK_TIMEOUT": "0.5"}
    with started_together(
        run_tabby(tmp_path_factory.mktemp("tabby"), folder, config=config, port=port, ready_timeout=120),
        run_site(tmp_path_factory.mktemp("site"), url, extra_env={"GANTRY_REFRESH_INTERVAL": "1"}),
        run_site(tmp_path_factory.mktemp("strict-site"), nowhere, extra_env=strict),
    ) as (tabby, site, strict_site):
        wait_loaded(tabby, TINY, timeout=120)
        yield tabby, site, strict_site


def switch(site: Site, model: str) -> httpx.Response:
    with site.session(ADMIN) as admin:
        return admin.post("/api/admin/models/switch", json={"model_id": model}, timeout=180)


def loading(site: Site) -> bool:
    rows = query(site, "SELECT step FROM models_admin_operation WHERE status = 'running'")
    return bool(rows) and rows[0]["step"] == "loading"


def stream(site: Site, key: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, dict[str, str], list[str]]:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", site.url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=timeout) as r:
        return r.status_code, dict(r.headers), [line for line in r.iter_lines() if line]


def test_a_streamed_request_sent_mid_load_is_held_and_answered_by_the_new_model(servers: tuple[TabbyServer, Site, Site]) -> None:
    _, site, _ = servers
    member_key, outsider_key = make_key(site, MEMBER)[1], make_key(site, OUTSIDER)[1]
    with ThreadPoolExecutor(3) as pool:
        switching = pool.submit(switch, site, TINY_V2)
        wait_until(lambda: loading(site), 60, "the switch to reach its load")
        streamed = pool.submit(stream, site, member_key, ASK)
        time.sleep(0.5)  # the second request comes after the first: one request ahead of it
        whole = pool.submit(lambda: openai_client(site, outsider_key).chat.completions.create(model=TINY_V2, **ASK))  # type: ignore[call-overload]
        assert switching.result(timeout=180).status_code == 200
        status, headers, lines = streamed.result(timeout=120)
        answer = whole.result(timeout=120)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    comments = [line for line in lines if line.startswith(":")]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    # Held while the new model loads: the load's progress and the request's place, then the answer.
    progress = [re.fullmatch(r": loading Tiny-Chat-5M-v2 (\d+)%, no requests ahead", line) for line in comments]
    percents = [int(m.group(1)) for m in progress if m]
    assert len(percents) >= 2 and percents == sorted(percents) and percents[-1] > percents[0], comments
    assert lines.index(comments[-1]) < lines.index("data: " + data[0]), "the comments come before the answer"
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["model"] for c in chunks} == {TINY_V2}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # The non-streamed request waited too, and was answered by the new model: nothing got 503.
    assert answer.model == TINY_V2 and answer.choices[0].message.content


def test_a_request_held_too_long_gets_503_with_retry_after(servers: tuple[TabbyServer, Site, Site]) -> None:
    _, _, strict_site = servers
    key = make_key(strict_site, MEMBER)[1]
    started = time.monotonic()
    response = httpx.post(strict_site.url + "/v1/chat/completions", json=ASK, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    waited = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    error = response.json()["error"]
    assert error["code"] == "held_too_long" and error["type"] == "server_error" and "2 seconds" in error["message"]
    assert 2 <= waited < 10
    left = "SELECT id FROM chat_conversation WHERE source = 'api'"
    wait_until(lambda: not query(strict_site, left), 5, "the refused request's rows to be deleted")

    # Streamed, the stream has begun: it says what the request waits for, then ends with OpenAI's error event.
    status, _, lines = stream(strict_site, key, ASK, timeout=30)
    assert status == 200
    assert any(line.startswith(": waiting for the model server, which cannot be reached") for line in lines), lines
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "held_too_long"


def test_the_queue_caps_bound_api_requests(servers: tuple[TabbyServer, Site, Site]) -> None:
    _, _, strict_site = servers
    key = make_key(strict_site, OUTSIDER)[1]
    headers = {"Authorization": f"Bearer {key}"}
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(httpx.post, strict_site.url + "/v1/chat/completions", json=ASK, headers=headers, timeout=30)
        waiting = "SELECT m.id FROM chat_message m JOIN chat_conversation c ON c.id = m.conversation_id WHERE m.status = 'queued'"
        wait_until(lambda: query(strict_site, waiting), 10, "the first request to wait in the queue")
        refused = httpx.post(strict_site.url + "/v1/chat/completions", json=ASK, headers=headers, timeout=30)
        assert held.result().status_code == 503
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "rate_limit_error" and "the limit is 1" in error["message"]


def test_a_held_request_whose_caller_goes_away_leaves_the_queue(servers: tuple[TabbyServer, Site, Site]) -> None:
    _, _, strict_site = servers
    key = make_key(strict_site, MEMBER, "impatient")[1]
    headers = {"Authorization": f"Bearer {key}"}
    waiting = "SELECT m.id FROM chat_message m JOIN chat_conversation c ON c.id = m.conversation_id WHERE c.source = 'api'"
    with httpx.stream("POST", strict_site.url + "/v1/chat/completions", json={**ASK, "stream": True}, headers=headers) as r:
        assert r.status_code == 200
        assert next(line for line in r.iter_lines() if line).startswith(": waiting for the model server")
        assert len(query(strict_site, waiting)) == 1
    wait_until(lambda: not query(strict_site, waiting), 1.5, "the request to leave the queue once its caller went away")
