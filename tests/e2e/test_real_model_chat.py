"""The chat page in a real Chromium, answered by a real model (SmolLM2-135M-Instruct): what `make run` shows."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from harness.site import MEMBER
from harness.tabby_server import TabbyServer, run_tabby, wait_loaded
from tests.e2e.conftest import log_in

pytestmark = pytest.mark.real_model

SMOL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tabby(real_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    """This module's site talks to a server of the models folder with SmolLM2 loaded, as `make run` starts it."""
    config = {"model": {"model_name": SMOL}, "developer": {"cpu_threads": 1}}
    with run_tabby(tmp_path_factory.mktemp("tabby"), real_model.parent, config=config) as server:
        wait_loaded(server, SMOL)
        yield server


def test_a_factual_question_in_the_chat_page_gets_a_correct_answer(page: Page) -> None:
    log_in(page, MEMBER)
    # Questions a 135M model answers right at its recommended sampling (the site sends none): it is
    # less sure of France, where 4 answers in 10 begin with "L'Étoile".
    page.get_by_label("Message").fill("What is the capital of Japan?")
    page.get_by_label("Message").press("Enter")
    answer = page.locator("#messages .message.assistant")
    expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=60_000)
    expect(answer.locator(".body")).to_contain_text("Tokyo")

    page.get_by_label("Message").fill("What is the capital of Germany?")
    page.get_by_label("Message").press("Enter")
    expect(page.locator("#messages .message.assistant")).to_have_count(2)
    second = page.locator("#messages .message.assistant").nth(1)
    expect(second).to_have_class(re.compile(r"\bdone\b"), timeout=60_000)
    expect(second.locator(".body")).to_contain_text("Berlin")
