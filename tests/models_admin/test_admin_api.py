"""The admin API against a live site and a live model server: the reference's curl examples, verbatim, and its rules.

The model directory gives the demo models the reference's names, so its examples run as written:
`Qwen2.5-Coder-7B-Instruct` is the tiny demo model (loaded at start), `Llama-3.1-8B-Instruct` the 200 MB
one, read from a simulated slow disk so that a switch to it takes a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.models_admin.live import backend, disagreement, loaded_model, operations, started_together, wait_until

SHARED_ENV = "GANTRY_SHARED_DIR"
# `shared/` sits beside the repository checkout.
SHARED_DIR = Path(os.environ.get(SHARED_ENV) or Path(__file__).resolve().parents[2].parent / "shared")
REFERENCE = SHARED_DIR / "reference" / "gantry-model-switching.md"

QWEN = "Qwen2.5-Coder-7B-Instruct"
LLAMA = "Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def servers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, TabbyServer]]:
    """This module's site and model server, whose model directory has the reference's model names."""
    model_dir = tmp_path_factory.mktemp("models")
    (model_dir / QWEN).symlink_to(demo_models / "Tiny-Chat-5M", target_is_directory=True)
    (model_dir / LLAMA).symlink_to(demo_models / "Small-Chat-200M", target_is_directory=True)
    # 60 MB/s: the 200 MB model takes about 3.5 s to load, the 5 MB one a tenth of a second.
    config = {"model": {"model_name": QWEN, "load_throttle_mbps": 60}, "developer": {"cpu_threads": 1}}
    port = free_port()
    with started_together(
        run_tabby(tmp_path_factory.mktemp("tabby"), model_dir, config=config, port=port),
        run_site(tmp_path_factory.mktemp("site"), f"http://127.0.0.1:{port}"),
    ) as (tabby, site):
        wait_loaded(tabby, QWEN)
        yield site, tabby


@pytest.fixture(scope="module")
def site(servers: tuple[Site, TabbyServer]) -> Site:
    return servers[0]


@pytest.fixture(scope="module")
def tabby(servers: tuple[Site, TabbyServer]) -> TabbyServer:
    return servers[1]


@pytest.fixture
def admin(site: Site) -> Iterator[httpx.Client]:
    with site.session(ADMIN) as client:
        yield client


# The reference's examples


def api_usage_examples() -> dict[str, tuple[str, Any]]:
    """The curl command and the documented success answer of each example in the reference's "API Usage"."""
    if not REFERENCE.is_file():
        pytest.fail(f"The reference is not at {REFERENCE}; set {SHARED_ENV} to the shared folder.", pytrace=False)
    text = REFERENCE.read_text(encoding="utf-8")
    section = text.split("\n## API Usage\n", 1)[1].split("\n## ", 1)[0]
    examples = {}
    for part in section.split("\n### ")[1:]:
        title = part.splitlines()[0]
        command = re.search(r"```bash\n(curl .*?)\n```", part, re.DOTALL)
        answer = re.search(r"\*\*Response(?: \(success\))?:\*\*\s*```json\n(.*?)\n```", part, re.DOTALL)
        assert command and answer, f"The example '{title}' lacks its curl command or its documented answer"
        examples[title] = (command.group(1), json.loads(answer.group(1)))
    assert set(examples) == {"Switch Model via API", "List Models via API", "Unload Model via API"}
    return examples


def run_curl(command: str, site: Site, session_id: str) -> Any:
    """Run a documented curl command as written, with a real session and this site's port."""
    port = urlsplit(site.url).port
    command = command.replace("abc123", session_id)
    if port != 8000:
        command = command.replace("localhost:8000", f"localhost:{port}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def leading_fields(models: list[dict[str, Any]]) -> dict[str, list[tuple[str, Any]]]:
    """Each model's first three fields, in order, by id (the list's order is not part of the contract)."""
    return {model["id"]: list(model.items())[:3] for model in models}


def switch(client: httpx.Client, model: str) -> httpx.Response:
    return client.post("/api/admin/models/switch", json={"model_id": model})


def ensure_active(admin: httpx.Client, model: str) -> None:
    assert switch(admin, model).status_code == 200


def operation_count(site: Site) -> int:
    return len(operations(site))


def test_the_references_curl_examples_work_verbatim(site: Site, tabby: TabbyServer, admin: httpx.Client) -> None:
    examples = api_usage_examples()
    session_id = admin.cookies["session_id"]
    ensure_active(admin, QWEN)
    list_command, documented_list = examples["List Models via API"]

    listed = run_curl(list_command, site, session_id)
    assert list(listed) == ["models"]
    assert leading_fields(listed["models"]) == leading_fields(documented_list["models"])
    assert loaded_model(tabby) == QWEN

    switch_command, documented_switch = examples["Switch Model via API"]
    assert documented_switch == {"message": f"Model switched to {LLAMA}", "model_id": LLAMA}
    assert run_curl(switch_command, site, session_id) == documented_switch
    assert loaded_model(tabby) == LLAMA

    listed = run_curl(list_command, site, session_id)
    assert leading_fields(listed["models"]) == {
        QWEN: [("id", QWEN), ("name", QWEN), ("active", False)],
        LLAMA: [("id", LLAMA), ("name", LLAMA), ("active", True)],
    }
    assert disagreement(site, admin, tabby) is None

    unload_command, documented_unload = examples["Unload Model via API"]
    assert documented_unload == {"message": "Model unloaded successfully"}
    assert run_curl(unload_command, site, session_id) == documented_unload
    assert loaded_model(tabby) is None
    assert not any(model["active"] for model in run_curl(list_command, site, session_id)["models"])
    assert disagreement(site, admin, tabby) is None


# The rules around them


def test_switching_to_the_active_model_answers_at_once_without_reloading(
    site: Site, tabby: TabbyServer, admin: httpx.Client
) -> None:
    ensure_active(admin, QWEN)
    before, loads = operation_count(site), tabby.log().count(f"Loading {QWEN}")
    response = switch(admin, QWEN)
    assert response.status_code == 200
    assert response.json() == {"message": f"Model switched to {QWEN}", "model_id": QWEN}
    assert operation_count(site) == before
    assert tabby.log().count(f"Loading {QWEN}") == loads
    assert loaded_model(tabby) == QWEN


def test_unloading_with_nothing_loaded_answers_200_with_the_same_message(
    site: Site, tabby: TabbyServer, admin: httpx.Client
) -> None:
    assert admin.post("/api/admin/models/unload").status_code == 200
    before = operation_count(site)
    response = admin.post("/api/admin/models/unload")
    assert response.status_code == 200
    assert response.json() == {"message": "Model unloaded successfully"}
    assert operation_count(site) == before
    assert loaded_model(tabby) is None


def test_an_unknown_model_is_404(site: Site, tabby: TabbyServer, admin: httpx.Client) -> None:
    before = operation_count(site)
    response = switch(admin, "Mistral-7B-Instruct-v0.3")
    assert response.status_code == 404
    assert response.json()["detail"] == "There is no model named Mistral-7B-Instruct-v0.3."
    assert operation_count(site) == before


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"Llama-3.1-8B-Instruct"',
        b"{}",
        b'{"model": "Llama-3.1-8B-Instruct"}',
        b'{"model_id": ""}',
        b'{"model_id": 8}',
    ],
)
def test_a_missing_or_malformed_body_is_400(site: Site, admin: httpx.Client, body: bytes) -> None:
    before = operation_count(site)
    response = admin.post("/api/admin/models/switch", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"detail": 'Send a JSON body like {"model_id": "<model name>"}.'}
    assert operation_count(site) == before


ADMIN_CALLS = [
    ("GET", "/api/admin/models", None),
    ("POST", "/api/admin/models/switch", {"model_id": LLAMA}),
    ("POST", "/api/admin/models/unload", None),
    ("POST", "/api/admin/models/refresh", None),
]


def test_a_member_is_refused_with_403(site: Site) -> None:
    with site.session(MEMBER) as member:
        for method, url, body in ADMIN_CALLS:
            response = member.request(method, url, json=body)
            assert response.status_code == 403, url
            assert response.json() == {"detail": "Only admins can manage models."}


def test_an_anonymous_caller_is_refused_with_401(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=30) as anonymous:
        for method, url, body in ADMIN_CALLS:
            response = anonymous.request(method, url, json=body)
            assert response.status_code == 401, url
            assert response.json() == {"detail": "Log in as an admin first (POST /api/auth/login)."}


def test_a_cross_site_browser_post_is_refused_with_403(site: Site, tabby: TabbyServer, admin: httpx.Client) -> None:
    ensure_active(admin, QWEN)
    before = operation_count(site)
    foreign = {"Origin": "https://evil.example"}
    for url, body in (("/api/admin/models/switch", {"model_id": LLAMA}), ("/api/admin/models/unload", None)):
        response = admin.post(url, json=body, headers=foreign)
        assert response.status_code == 403, url
        assert response.json() == {"detail": "Cross-site requests are refused."}
    assert operation_count(site) == before
    assert loaded_model(tabby) == QWEN


def test_a_waiting_switch_holds_no_thread_other_requests_are_answered_meanwhile(
    site: Site, tabby: TabbyServer, admin: httpx.Client
) -> None:
    ensure_active(admin, QWEN)
    before = operation_count(site)
    session_id = admin.cookies["session_id"]

    def request(method: str, url: str, body: Any = None) -> tuple[httpx.Response, float]:
        with httpx.Client(base_url=site.url, cookies={"session_id": session_id}, timeout=60) as client:
            started = time.monotonic()
            response = client.request(method, url, json=body)
            return response, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=25) as pool:
        waiting = [pool.submit(request, "POST", "/api/admin/models/switch", {"model_id": LLAMA}) for _ in range(5)]
        wait_until(lambda: backend(site)["state"] == "switching", 10, "the switch to start")
        gets = [pool.submit(request, "GET", "/api/admin/models") for _ in range(20)]
        answered = [future.result() for future in gets]
        assert backend(site)["state"] == "switching", "the switch ended before the other requests were answered"
        assert not any(future.done() for future in waiting)
        switched = [future.result()[0] for future in waiting]
    assert all(response.status_code == 200 for response, _ in answered)
    assert max(seconds for _, seconds in answered) < 2.0
    assert all(response.json() == {"message": f"Model switched to {LLAMA}", "model_id": LLAMA} for response in switched)
    assert operation_count(site) == before + 1  # the five requests joined one switch
    assert loaded_model(tabby) == LLAMA
    assert disagreement(site, admin, tabby) is None
