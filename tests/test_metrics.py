"""/metrics on a live site: who may read it, and figures that move by the right amounts when people chat,
open pages, mistype passwords and switch models.

The site's model server reads from a simulated 2 MB/s disk, so a switch to the 5 MB model takes a few
seconds: long enough to hold a message. `Tiny-Chat-5M-v2` is the same model in a second folder;
`Broken-Chat` a folder whose config is cut short, so a switch to it fails and the previous model is
loaded again.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, receive_until, run_site
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.figures import BEARER, PROMISED, TOKEN, Figures, moved, scrape, timestamp
from tests.models_admin.live import backend, query, started_together, wait_until

TINY = "Tiny-Chat-5M"
TINY_V2 = "Tiny-Chat-5M-v2"
BROKEN = "Broken-Chat"
FINAL = {"done", "failed", "cancelled"}


@pytest.fixture(scope="module")
def servers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TabbyServer, Site]]:
    folder = tmp_path_factory.mktemp("models")
    for name in (TINY, TINY_V2):
        (folder / name).symlink_to(demo_models / TINY, target_is_directory=True)
    shutil.copytree(demo_models / TINY, folder / BROKEN)
    (folder / BROKEN / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 12')
    config = {"model": {"model_name": TINY, "load_throttle_mbps": 2}, "developer": {"cpu_threads": 1}}
    port = free_port()
    with started_together(
        run_tabby(tmp_path_factory.mktemp("tabby"), folder, config=config, port=port),
        run_site(tmp_path_factory.mktemp("site"), f"http://127.0.0.1:{port}", extra_env={"GANTRY_METRICS_TOKEN": TOKEN}),
    ) as (tabby, site):
        wait_loaded(tabby, TINY)
        wait_until(lambda: backend(site)["active_model"] == TINY, 30, "the site to learn the loaded model")
        yield tabby, site


@pytest.fixture(scope="module")
def site(servers: tuple[TabbyServer, Site]) -> Site:
    return servers[1]


@pytest.fixture
def admin(site: Site) -> Iterator[httpx.Client]:
    with site.session(ADMIN) as client:
        yield client


def new_conversation(client: httpx.Client) -> int:
    response = client.post("/api/conversations/", json={})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def post(client: httpx.Client, conversation_id: int, content: str) -> dict[str, Any]:
    response = client.post(f"/api/conversations/{conversation_id}/messages/", json={"content": content})
    assert response.status_code == 202, response.text
    return dict(response.json())


def settled(client: httpx.Client, conversation_id: int, timeout: float = 60) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        messages = client.get(f"/api/conversations/{conversation_id}/messages/").json()
        return messages if len(messages) % 2 == 0 and all(m["status"] in FINAL for m in messages) else None

    messages = wait_until(done, timeout, "every message of the conversation to be answered")
    assert messages is not None
    return messages


# Access


def test_the_metrics_are_for_admins_and_for_the_token(site: Site, admin: httpx.Client) -> None:
    anonymous = httpx.get(site.url + "/metrics")
    with site.session(MEMBER) as member:
        refused = member.get("/metrics")
    wrong = httpx.get(site.url + "/metrics", headers={"Authorization": "Bearer not-the-token"})
    # Prometheus addresses a process by container name or IP address, which ALLOWED_HOSTS need not list.
    foreign_host = {**BEARER, "Host": "10.0.0.7:8000"}
    by_token = httpx.get(site.url + "/metrics", headers=foreign_host)
    page_on_that_host = httpx.get(site.url + "/login/", headers=foreign_host)

    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"
    assert anonymous.json() == {
        "detail": "Log in as an admin (or send Authorization: Bearer <GANTRY_METRICS_TOKEN>) to read the metrics."
    }
    assert refused.status_code == 403 and refused.json() == {"detail": "Only admins can read the metrics."}
    assert wrong.status_code == 401
    assert wrong.json() == {"detail": "Send Authorization: Bearer <GANTRY_METRICS_TOKEN> to read the metrics."}
    assert by_token.status_code == 200 and "gantry_queue_depth" in Figures(by_token.text).types
    assert page_on_that_host.status_code == 400  # pages still check the host
    assert scrape(admin).get("gantry_backend_up", backend="default") == 1


# Chat


def test_each_answer_counts_once_in_first_token_and_speed(site: Site, admin: httpx.Client) -> None:
    before = scrape(admin)
    started = time.monotonic()
    with site.session(MEMBER) as member:
        conversations = [new_conversation(member) for _ in range(3)]
        for conversation in conversations:
            post(member, conversation, "Tell me about cranes.")
        answers = [settled(member, conversation)[-1] for conversation in conversations]
    elapsed = time.monotonic() - started
    after = scrape(admin)

    assert [(a["status"], a["model_name"]) for a in answers] == [("done", TINY)] * 3
    assert moved(before, after, "gantry_generation_first_token_seconds_count", model=TINY) == 3
    assert 0 < moved(before, after, "gantry_generation_first_token_seconds_sum", model=TINY) < 3 * elapsed
    assert moved(before, after, "gantry_generation_tokens_per_second_count", model=TINY) == 3
    assert moved(before, after, "gantry_generation_tokens_per_second_sum", model=TINY) > 0
    assert moved(before, after, "gantry_hold_seconds_count") == 0  # answered at once: never held
    assert after.get("gantry_queue_depth") == 0 and after.get("gantry_generations_running") == 0


async def test_a_running_answer_and_open_pages_are_counted(site: Site, admin: httpx.Client) -> None:
    before = scrape(admin)
    with site.session(MEMBER) as member:
        conversation = new_conversation(member)
        async with site.socket(f"/ws/chat/{conversation}/", member) as chat, site.socket("/ws/models/", admin):
            await receive_until(chat, lambda event: event["type"] == "model.state")
            question = post(member, conversation, "Write a long story about a gantry crane.")
            await receive_until(chat, lambda event: event["type"] == "chat.token")
            during = scrape(admin)
            # Stopped after the scrape: the answer was still running when it was counted.
            stopped = member.post(f"/api/messages/{question['id']}/stop/")
            assert stopped.status_code == 200 and stopped.json()["status"] == "cancelled", stopped.text
            open_pages = scrape(admin)
        settled(member, conversation)

    def closed() -> Figures | None:
        figures = scrape(admin)
        return (
            figures
            if figures.get("gantry_websocket_connections", page="chat") == before.get("gantry_websocket_connections", page="chat")
            else None
        )

    after = wait_until(closed, 10, "the closed sockets to be counted out")
    assert after is not None
    assert during.get("gantry_generations_running") == 1
    assert moved(before, open_pages, "gantry_websocket_connections", page="chat") == 1
    assert moved(before, open_pages, "gantry_websocket_connections", page="models") == 1
    assert after.get("gantry_websocket_connections", page="models") == before.get("gantry_websocket_connections", page="models")
    assert after.get("gantry_generations_running") == 0
    # A stopped answer has its first token but no speed: only answers that end by themselves have one.
    assert moved(before, after, "gantry_generation_first_token_seconds_count", model=TINY) == 1
    assert moved(before, after, "gantry_generation_tokens_per_second_count", model=TINY) == 0


def test_wrong_passwords_are_counted(site: Site, admin: httpx.Client) -> None:
    before = scrape(admin)
    stranger = f"nobody-{secrets.token_hex(3)}"
    for password in ("guess-1", "guess-2", "guess-3"):
        response = httpx.post(site.url + "/api/auth/login", json={"username": stranger, "password": password})
        assert response.status_code == 400
    with site.session(MEMBER):
        pass  # a right password is no failure
    assert moved(before, scrape(admin), "gantry_login_failures_total") == 3


# Switches


def operation_row(site: Site, operation_id: int | None = None) -> dict[str, Any]:
    """An operation as the audit log has it (None: the latest)."""
    columns = "SELECT status, started, finished, load_seconds, rolled_back FROM models_admin_operation"
    if operation_id is None:
        return query(site, columns + " ORDER BY id DESC LIMIT 1")[0]
    return query(site, columns + " WHERE id = ?", operation_id)[0]


def created(site: Site, message_id: int) -> Any:
    return timestamp(query(site, "SELECT created FROM chat_message WHERE id = ?", message_id)[0]["created"])


def test_a_switch_moves_its_figures_by_what_the_audit_log_recorded(site: Site, admin: httpx.Client) -> None:
    before = scrape(admin)
    with site.session(MEMBER) as member, site.session(ADMIN) as switcher, ThreadPoolExecutor(max_workers=1) as pool:
        conversation = new_conversation(member)
        switching = pool.submit(switcher.post, "/api/admin/models/switch", json={"model_id": TINY_V2})
        wait_until(lambda: backend(site)["state"] == "switching", 30, "the switch to start")
        held = post(member, conversation, "Are you there?")
        during = scrape(admin)
        response = switching.result(timeout=120)
        assert response.status_code == 200, response.text
        messages = settled(member, conversation)
    after = scrape(admin)
    operation = operation_row(site)
    duration = (timestamp(operation["finished"]) - timestamp(operation["started"])).total_seconds()
    answer = messages[-1]
    # Its answer's row is made as it is released: the time between the two rows is the time it was held.
    waited = (created(site, answer["id"]) - created(site, held["id"])).total_seconds()

    assert held["status"] == "queued" and answer["status"] == "done" and answer["model_name"] == TINY_V2
    assert during.get("gantry_queue_depth") == 1
    assert during.get("gantry_backend_state", backend="default", state="switching") == 1
    assert during.labels_of("gantry_backend_active_model") == []
    assert moved(before, after, "gantry_model_switches_total", outcome="succeeded") == 1
    assert moved(before, after, "gantry_model_switches_total", outcome="failed") == 0
    labels = {"model": TINY_V2, "outcome": "succeeded"}
    assert moved(before, after, "gantry_model_switch_duration_seconds_count", **labels) == 1
    assert moved(before, after, "gantry_model_switch_duration_seconds_sum", **labels) == pytest.approx(duration, abs=1e-3)
    assert moved(before, after, "gantry_model_load_seconds_count", model=TINY_V2) == 1
    assert moved(before, after, "gantry_model_load_seconds_sum", model=TINY_V2) == pytest.approx(
        operation["load_seconds"], abs=1e-3
    )
    assert after.get("gantry_model_last_load_seconds", model=TINY_V2) == pytest.approx(operation["load_seconds"], abs=1e-3)
    assert moved(before, after, "gantry_hold_seconds_count") == 1
    assert moved(before, after, "gantry_hold_seconds_sum") == pytest.approx(waited, abs=0.25)
    assert waited > 0.5  # it was held while the model loaded
    assert after.labels_of("gantry_backend_active_model") == [{"backend": "default", "model": TINY_V2}]
    assert after.get("gantry_queue_depth") == 0


def test_a_failed_switch_counts_as_failed_and_its_rollback_as_a_load(site: Site, admin: httpx.Client) -> None:
    before = scrape(admin)
    previous = backend(site)["active_model"]
    response = admin.post("/api/admin/models/switch", json={"model_id": BROKEN})
    after = scrape(admin)
    operation = operation_row(site, int(response.json()["operation_id"]))

    assert response.status_code == 502 and response.json()["rolled_back"] is True, response.text
    assert moved(before, after, "gantry_model_switches_total", outcome="failed") == 1
    assert moved(before, after, "gantry_model_switches_total", outcome="succeeded") == 0
    assert moved(before, after, "gantry_rollbacks_total") == 1
    assert moved(before, after, "gantry_model_switch_duration_seconds_count", model=BROKEN, outcome="failed") == 1
    assert moved(before, after, "gantry_model_load_seconds_count", model=previous) == 1  # the reload
    assert moved(before, after, "gantry_model_load_seconds_sum", model=previous) == pytest.approx(
        operation["load_seconds"], abs=1e-3
    )
    assert moved(before, after, "gantry_model_load_seconds_count", model=BROKEN) == 0
    assert after.labels_of("gantry_backend_active_model") == [{"backend": "default", "model": previous}]


def test_every_promised_metric_is_served_with_its_type(admin: httpx.Client) -> None:
    served = scrape(admin).types
    assert {name: served.get(name) for name in PROMISED} == PROMISED
