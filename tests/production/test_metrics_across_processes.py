"""Metrics with several processes: two daphne processes sharing PROMETHEUS_MULTIPROC_DIR (one machine),
and a Celery worker and beat each serving their own on GANTRY_METRICS_PORT (their own containers in
docker-compose.yml), meeting in Redis and PostgreSQL.

Either web process serves the events of both; the worker's events (a held message it released, the
answer it generated) are served by the worker; the figures read from the database are the same
whichever web process is asked. Last, Redis and then the database go away and /readyz says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from harness.site import ADMIN, MEMBER, Site, receive_until, run_site, start_daphne
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.figures import BEARER, TOKEN, Figures, moved, scrape, timestamp
from tests.models_admin.live import backend, query, started_together, wait_until
from tests.production.stack import PG_ADMIN_URL, private_database, private_redis, start_celery, start_worker

TINY = "Tiny-Chat-5M"
TINY_V2 = "Tiny-Chat-5M-v2"
FINAL = {"done", "failed", "cancelled"}


@dataclass
class Stack:
    tabby: TabbyServer
    web: list[Site]  # the same site through each daphne process
    worker_url: str
    beat_url: str
    redis_url: str
    database_url: str


def celery_site(site: Site, port: int) -> Site:
    """The site's settings for a Celery process on a machine (container) of its own: no shared
    multiprocess directory, its metrics on `port`."""
    env = {k: v for k, v in site.env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return replace(site, env={**env, "GANTRY_METRICS_PORT": str(port)})


@pytest.fixture(scope="module")
def stack(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("models")
    for name in (TINY, TINY_V2):
        (folder / name).symlink_to(demo_models / TINY, target_is_directory=True)
    config = {"model": {"model_name": TINY, "load_throttle_mbps": 2}, "developer": {"cpu_threads": 1}}
    workdir = tmp_path_factory.mktemp("production")
    shared = workdir / "web-metrics"
    shared.mkdir()
    with private_redis(workdir) as redis_url, private_database() as database_url:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "SECRET_KEY": "production-test-secret-key",
            "GANTRY_METRICS_TOKEN": TOKEN,
            "PROMETHEUS_MULTIPROC_DIR": str(shared),
        }
        port = free_port()
        with started_together(
            run_tabby(tmp_path_factory.mktemp("tabby"), folder, config=config, port=port),
            run_site(workdir, f"http://127.0.0.1:{port}", extra_env=env),
        ) as (tabby, site):
            second = free_port()
            start_daphne(site, second, name="daphne-2")
            worker_port, beat_port = free_port(), free_port()
            start_worker(celery_site(site, worker_port), "worker-1")
            start_celery(celery_site(site, beat_port), "beat", "beat", "--schedule", str(workdir / "beat-schedule"))
            wait_loaded(tabby, TINY)
            wait_until(lambda: backend(site)["active_model"] == TINY, 30, "the site to learn the loaded model")
            urls = [f"http://127.0.0.1:{p}" for p in (worker_port, beat_port)]
            wait_until(lambda: all(answers(url + "/healthz") for url in urls), 30, "the Celery processes' metrics servers")
            web = [site, replace(site, url=f"http://127.0.0.1:{second}")]
            yield Stack(tabby, web, urls[0], urls[1], redis_url, database_url)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def chat(client: httpx.Client, content: str) -> dict[str, Any]:
    conversation = client.post("/api/conversations/", json={}).json()
    response = client.post(f"/api/conversations/{conversation['id']}/messages/", json={"content": content})
    assert response.status_code == 202, response.text
    return {"conversation": conversation["id"], **response.json()}


def settled(client: httpx.Client, conversation_id: int) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        messages = client.get(f"/api/conversations/{conversation_id}/messages/").json()
        return messages if len(messages) % 2 == 0 and all(m["status"] in FINAL for m in messages) else None

    messages = wait_until(done, 60, "the conversation's answers")
    assert messages is not None
    return messages


async def test_either_web_process_serves_the_answers_and_sockets_of_both(stack: Stack) -> None:
    one, two = stack.web
    before = scrape(one.url)
    with one.session(MEMBER) as first, two.session(MEMBER) as second:
        posted = [
            (first, chat(first, "Hello")),
            (first, chat(first, "Hi")),
            (second, chat(second, "Hey")),
            (second, chat(second, "Yo")),
        ]
        answers = [settled(client, message["conversation"])[-1] for client, message in posted]
        async with one.socket("/ws/chat/", first) as a, two.socket("/ws/chat/", second) as b:
            for socket in (a, b):
                await receive_until(socket, lambda event: event["type"] == "model.state")
            open_pages = [scrape(one.url), scrape(two.url)]

    def closed() -> Figures | None:
        figures = scrape(two.url)
        count = figures.get("gantry_websocket_connections", page="chat")
        return figures if count == before.get("gantry_websocket_connections", page="chat") else None

    after = wait_until(closed, 10, "the closed sockets to be counted out")
    assert after is not None
    assert [answer["status"] for answer in answers] == ["done"] * 4
    assert moved(before, after, "gantry_generation_first_token_seconds_count", model=TINY) == 4
    assert moved(before, after, "gantry_generation_tokens_per_second_count", model=TINY) == 4
    for figures in open_pages:
        assert moved(before, figures, "gantry_websocket_connections", page="chat") == 2


def test_a_switch_run_by_the_worker_counts_once_whichever_process_is_asked(stack: Stack) -> None:
    one, two = stack.web
    web_before, worker_before = scrape(one.url), scrape(stack.worker_url)
    with one.session(ADMIN) as admin, two.session(MEMBER) as member, ThreadPoolExecutor(max_workers=1) as pool:
        switching = pool.submit(admin.post, "/api/admin/models/switch", json={"model_id": TINY_V2})
        wait_until(lambda: backend(one)["state"] == "switching", 30, "the switch to start")
        held = chat(member, "Are you there?")
        during = [scrape(one.url), scrape(two.url)]
        assert switching.result(timeout=120).status_code == 200
        answer = settled(member, held["conversation"])[-1]
    web_after, other_web, worker_after = scrape(one.url), scrape(two.url), scrape(stack.worker_url)
    operation = query(one, "SELECT started, finished FROM models_admin_operation ORDER BY id DESC LIMIT 1")[0]
    duration = (timestamp(operation["finished"]) - timestamp(operation["started"])).total_seconds()

    assert held["status"] == "queued" and answer["status"] == "done" and answer["model_name"] == TINY_V2
    assert [figures.get("gantry_queue_depth") for figures in during] == [1, 1]
    # Read from the database: the same from either web process, though neither ran the switch.
    for figures in (web_after, other_web):
        assert moved(web_before, figures, "gantry_model_switches_total", outcome="succeeded") == 1
        labels = {"model": TINY_V2, "outcome": "succeeded"}
        assert moved(web_before, figures, "gantry_model_switch_duration_seconds_sum", **labels) == pytest.approx(
            duration, abs=1e-3
        )
    # Events: the held message was released, and answered, once in all (by whichever process released it).
    for name, labels in (("gantry_hold_seconds_count", {}), ("gantry_generation_first_token_seconds_count", {"model": TINY_V2})):
        by_web, by_worker = moved(web_before, web_after, name, **labels), moved(worker_before, worker_after, name, **labels)
        assert by_web + by_worker == 1, (name, by_web, by_worker)


def test_celery_processes_serve_their_health_and_their_metrics_for_the_token(stack: Stack) -> None:
    for url in (stack.worker_url, stack.beat_url):
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
        refused = httpx.get(url + "/metrics")
        assert refused.status_code == 401
        assert refused.json() == {"detail": "Send Authorization: Bearer <GANTRY_METRICS_TOKEN> to read the metrics."}
        figures = scrape(url, BEARER)
        assert "gantry_hold_seconds" in figures.types and "gantry_queue_depth" not in figures.types  # events only


def test_readyz_names_redis_and_then_the_database_when_they_go_away(stack: Stack) -> None:
    one, two = stack.web
    ready = httpx.get(one.url + "/readyz", timeout=30)
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"database": "ok", "channel_layer": "ok", "model_server": "ok"},
        "backends": {"default": {"health": "ok", "in_rotation": True}},
    }

    redis.Redis.from_url(stack.redis_url).shutdown(nosave=True)
    without_redis = httpx.get(two.url + "/readyz", timeout=30)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{stack.database_url.rsplit("/", 1)[1]}" WITH (FORCE)')
    without_either = httpx.get(two.url + "/readyz", timeout=30)

    assert without_redis.status_code == 503
    assert without_redis.json()["failed"] == ["channel_layer"]
    assert without_redis.json()["checks"]["channel_layer"] == "The channel layer (Redis) does not answer."
    assert without_either.status_code == 503
    assert without_either.json()["failed"] == ["database", "channel_layer"]
    assert without_either.json()["detail"] == "The database does not answer. The channel layer (Redis) does not answer."
