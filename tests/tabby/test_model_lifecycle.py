"""Loading, reloading and unloading models on the real server, with real weights."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from harness.tabby_server import TabbyServer, load_events, run_tabby
from tests.tabby.conftest import SMALL, TINY

HELLO = [{"role": "user", "content": "Tell me about packages."}]


@pytest.fixture(scope="module")
def server(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    """A server that starts with nothing loaded; tests load what they need."""
    with run_tabby(tmp_path_factory.mktemp("tabby"), demo_models, config={"model": {"unload_timeout": 30}}) as server:
        yield server


def ensure_loaded(server: TabbyServer, name: str) -> None:
    assert load_events(server, name)[-1]["status"] == "finished"


def test_load_progress_rises_one_module_at_a_time_and_ends_with_finished(server: TabbyServer) -> None:
    events = load_events(server, SMALL)
    *steps, last = events
    modules = last["modules"]
    assert modules == 1 + 14 * 2 + 2  # embeddings, attention and MLP of 14 layers, final norm, head
    assert [e["module"] for e in steps] == list(range(1, modules + 1))
    assert all(e == {"model_type": "model", "module": e["module"], "modules": modules, "status": "processing"} for e in steps)
    assert last == {"model_type": "model", "module": modules, "modules": modules, "status": "finished"}


def test_the_model_card_shows_the_loaded_model_with_its_parameters(server: TabbyServer) -> None:
    ensure_loaded(server, SMALL)
    with server.client() as client:
        card = client.get("/v1/model").json()
        listed = client.get("/v1/models").json()["data"]
    assert card["id"] == SMALL and card["owned_by"] == "tabbyAPI"
    assert card["parameters"]["max_seq_len"] == 4096
    assert card["parameters"]["prompt_template"]
    assert [c["id"] for c in listed] == [SMALL]


def test_loading_the_loaded_model_gives_processing_then_finished_one_of_one(server: TabbyServer) -> None:
    ensure_loaded(server, SMALL)
    assert load_events(server, SMALL) == [
        {"model_type": "model", "module": 1, "modules": 1, "status": "processing"},
        {"model_type": "model", "module": 1, "modules": 1, "status": "finished"},
    ]


def test_the_admin_key_lists_every_model_folder(server: TabbyServer) -> None:
    with server.client(admin=True) as client:
        names = {c["id"] for c in client.get("/v1/models").json()["data"]}
    assert {TINY, SMALL} <= names


@pytest.mark.parametrize("name", ["../models", "..", "/etc", "a/../../b"])
def test_a_model_name_that_is_a_path_is_refused(server: TabbyServer, name: str) -> None:
    with server.client(admin=True) as client:
        response = client.post("/v1/model/load", json={"model_name": name})
    assert response.status_code == 400
    assert "folder" in response.json()["detail"] or "Could not find" in response.json()["detail"]


def test_a_load_asking_for_a_draft_model_is_refused_before_anything_changes(server: TabbyServer) -> None:
    ensure_loaded(server, TINY)
    with server.client(admin=True) as client:
        response = client.post("/v1/model/load", json={"model_name": SMALL, "draft_model": {"draft_model_name": TINY}})
        card = client.get("/v1/model").json()
    assert response.status_code == 400
    assert response.json() == {
        "detail": "This server does not run draft models (speculative decoding); load without draft_model."
    }
    assert card["id"] == TINY
    # Without a draft model name TabbyAPI loads no draft either; the load goes ahead.
    assert load_events(server, TINY, draft_model={})[-1]["status"] == "finished"


def test_the_servers_model_settings_apply_to_every_load_unless_the_request_says_otherwise(
    demo_models: Path, tmp_path: Path
) -> None:
    config = {"model": {"max_seq_len": 512}, "developer": {"cpu_threads": 1}}
    with run_tabby(tmp_path, demo_models, config=config) as server, server.client(admin=True) as client:
        assert load_events(server, TINY)[-1]["status"] == "finished"
        assert client.get("/v1/model").json()["parameters"]["max_seq_len"] == 512
        client.post("/v1/model/unload")
        assert load_events(server, TINY, max_seq_len=1024)[-1]["status"] == "finished"
        assert client.get("/v1/model").json()["parameters"]["max_seq_len"] == 1024


def test_a_broken_config_fails_the_load_and_the_loaded_model_keeps_answering(server: TabbyServer, demo_models: Path) -> None:
    ensure_loaded(server, TINY)
    broken = demo_models.parent / "var" / "broken-models"
    bad = broken / "Broken-Config"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": ')
    link = demo_models / "Broken-Config"
    if not link.exists():
        link.symlink_to(bad, target_is_directory=True)
    try:
        events = load_events(server, "Broken-Config")
    finally:
        link.unlink()
    assert len(events) == 1 and events[0]["error"]["message"].startswith("Failed to load config.json from")
    assert events[0]["error"]["trace"] is None
    with server.client() as client:
        assert client.get("/v1/model").json()["id"] == TINY
        assert client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}).status_code == 200


def test_a_request_sent_during_a_load_gets_503_json(server: TabbyServer) -> None:
    ensure_loaded(server, TINY)
    events: list[dict[str, object]] = []
    # 200 MB at 100 MB/s: the load stays open for about two seconds, module by module.
    loader = threading.Thread(target=lambda: events.extend(load_events(server, SMALL, load_throttle_mbps=100)))
    loader.start()
    try:
        with server.client() as client:
            deadline = time.monotonic() + 10
            while (response := client.get("/v1/model")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            chat = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3, "stream": True})
    finally:
        loader.join()
    assert response.status_code == 503
    assert chat.status_code == 503
    assert chat.headers["content-type"] == "application/json"
    assert chat.json() == {"detail": "No models are currently loaded."}
    assert events[-1]["status"] == "finished" and len(events) == 31 + 1


def test_unload_during_a_streaming_answer_lets_it_finish_first(server: TabbyServer) -> None:
    ensure_loaded(server, TINY)
    body = {"messages": HELLO, "max_tokens": 150, "stream": True, "ban_eos_token": True}
    unloaded_at: list[float] = []
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        unloader = threading.Thread(
            target=lambda: unloaded_at.append(time.monotonic()) if httpx.post(
                server.url + "/v1/model/unload", headers=server.headers(admin=True), timeout=60
            ).status_code == 200 else None
        )
        unloader.start()
        rest = [line for line in lines if line.startswith("data: ")]
        finished_at = time.monotonic()
    unloader.join()
    assert json.loads(first[6:])["choices"][0]["delta"]["content"]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert unloaded_at and unloaded_at[0] >= finished_at - 0.05
    with server.client() as client:
        assert client.get("/v1/model").status_code == 503


def test_a_client_that_disconnects_cancels_its_generation(server: TabbyServer) -> None:
    ensure_loaded(server, TINY)
    body = {"messages": HELLO, "max_tokens": 1800, "stream": True, "ban_eos_token": True}
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        next(line for line in response.iter_lines() if line.startswith("data: {"))
    # Unload waits up to 30 s for running generations; the abandoned one must already be gone.
    started = time.monotonic()
    with server.client(admin=True) as client:
        assert client.post("/v1/model/unload").status_code == 200
    assert time.monotonic() - started < 3


def test_unload_gives_the_memory_back(server: TabbyServer) -> None:
    process = psutil.Process(server.process.pid)
    ensure_loaded(server, TINY)  # the first load imports the model code; measure after it
    with server.client(admin=True) as client:
        client.post("/v1/model/unload")
        before = process.memory_info().rss
        ensure_loaded(server, SMALL)
        assert client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8}).status_code == 200
        loaded = process.memory_info().rss
        assert client.post("/v1/model/unload").status_code == 200
        after = process.memory_info().rss
        assert client.get("/v1/model").status_code == 503
    assert loaded - before > 150_000_000  # the weights really were in memory
    assert after - before < 50_000_000, f"{(after - before) / 1e6:.1f} MB more than before the load"
