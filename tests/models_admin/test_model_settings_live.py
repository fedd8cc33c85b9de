"""A model's settings reach the real model server: its load parameters with the next switch to it (the
server's model card says so), its generation defaults and system prompt with every chat answer.

The live site and model server share a model folder, `Tiny-Chat-5M-Strict`: the tiny demo model with a
second chat template, `needs-system`, that refuses a conversation not starting with the system prompt
below. Loaded with `prompt_template: needs-system` (a load parameter), it answers only requests that carry
that system prompt first, so an answer proves both got there.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import TabbyServer, free_port, run_tabby, wait_loaded
from tests.models_admin.live import started_together

TINY = "Tiny-Chat-5M"
STRICT = "Tiny-Chat-5M-Strict"
SYSTEM = "Answer tersely."
NEEDS_SYSTEM = (
    "{% if messages[0]['role'] != 'system' or messages[0]['content'] != '" + SYSTEM + "' %}"
    "{{ raise_exception('This model needs its system prompt first.') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FINAL = {"done", "failed", "cancelled"}


@pytest.fixture(scope="module")
def servers(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, TabbyServer]]:
    model_dir = tmp_path_factory.mktemp("models")
    (model_dir / TINY).symlink_to(demo_models / TINY, target_is_directory=True)
    shutil.copytree(demo_models / TINY, model_dir / STRICT)
    config_path = model_dir / STRICT / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [
        {"name": "default", "template": config["chat_template"]},
        {"name": "needs-system", "template": NEEDS_SYSTEM},
    ]
    config_path.write_text(json.dumps(config))
    port = free_port()
    tabby_config = {"model": {"model_name": TINY}, "developer": {"cpu_threads": 1}}
    with started_together(
        run_tabby(tmp_path_factory.mktemp("tabby"), model_dir, config=tabby_config, port=port),
        run_site(tmp_path_factory.mktemp("site"), f"http://127.0.0.1:{port}"),
    ) as (tabby, site):
        wait_loaded(tabby, TINY)
        yield site, tabby


def answer_to(client: httpx.Client, conversation_id: int, content: str, timeout: float = 90) -> dict[str, Any]:
    """Post a message and return its answer once settled (its question's error, if it failed)."""
    posted = client.post(f"/api/conversations/{conversation_id}/messages/", json={"content": content})
    assert posted.status_code == 202, posted.text
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = client.get(f"/api/conversations/{conversation_id}/messages/").json()
        question = next(m for m in messages if m["id"] == posted.json()["id"])
        answer = next((m for m in messages if m.get("reply_to") == question["id"]), None)
        if question["status"] in FINAL and (answer is None or answer["status"] in FINAL):
            return {"status": question["status"], "error": question["error"], "content": answer["content"] if answer else ""}
        time.sleep(0.1)
    raise AssertionError(f"No answer within {timeout:g} s")


def answered_tokens(admin: httpx.Client, model: str) -> int:
    """The completion tokens the model server counted for the model's answers today (the Usage tab's
    figures): a short answer's text may end in half a character, which encodes again to more tokens."""
    usage = admin.get("/api/admin/usage", params={"days": 1})
    assert usage.status_code == 200, usage.text
    return sum(int(row["completion_tokens"]) for row in usage.json()["rows"] if row["model"] == model)


def test_load_parameters_go_with_the_next_switch_and_generation_defaults_with_every_answer(
    servers: tuple[Site, TabbyServer],
) -> None:
    site, tabby = servers
    url = f"/api/admin/models/{STRICT}/settings"
    with site.session(ADMIN) as admin, site.session(MEMBER) as member:
        assert admin.post("/api/admin/models/refresh").status_code == 200
        load = {"max_seq_len": 512, "cache_size": 768, "prompt_template": "needs-system"}
        saved = admin.put(url, json={**load, "max_tokens": 4})
        assert saved.status_code == 200, saved.text

        switched = admin.post("/api/admin/models/switch", json={"model_id": STRICT}, timeout=120)
        assert switched.status_code == 200, switched.text
        with tabby.client() as client:
            card = client.get("/v1/model").json()
        assert card["id"] == STRICT
        assert {key: card["parameters"][key] for key in load} == load

        conversation = member.post("/api/conversations/", json={}).json()["id"]
        refused = answer_to(member, conversation, "Hello there")
        assert refused["status"] == "failed" and "This model needs its system prompt first" in refused["error"]

        assert admin.put(url, json={**load, "max_tokens": 4, "system_prompt": SYSTEM}).status_code == 200
        before = answered_tokens(admin, STRICT)
        short = answer_to(member, conversation, "Hello again")
        assert short["status"] == "done", short
        assert short["content"] and 0 < answered_tokens(admin, STRICT) - before <= 4

        assert admin.put(url, json={**load, "max_tokens": 48, "system_prompt": SYSTEM}).status_code == 200
        before = answered_tokens(admin, STRICT)
        longer = answer_to(member, conversation, "And once more")
        assert longer["status"] == "done", longer
        assert answered_tokens(admin, STRICT) - before > 4
