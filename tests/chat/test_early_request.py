"""An answer's request sent before its question is saved, on a guess of its backend (an API request,
before its conversation is written): the claim keeps it when it picks the same backend holding the same
model, else withdraws it (its generation ends unseen) and sends it where it belongs, or nowhere."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest

from chat.balance import model_for, pick
from chat.generation import Answer, EarlyRequest
from chat.queue import first_guess
from chat.streaming import Prompt
from models_admin.models import Backend


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, concurrent.futures.Future[Answer | None]]]:
    """Where each request went, with what its generation will be told (its rows, or None: withdrawn).
    The request itself is not sent: `send` keeps everything but the spawning of the generation."""
    log: list[tuple[str, concurrent.futures.Future[Answer | None]]] = []

    def send(self: EarlyRequest, history: Prompt, then: Any, backend: Backend) -> None:
        self.withdraw()
        self._saved = concurrent.futures.Future()
        self.backend = backend
        log.append((f"{backend.name}/{history.turns[0]['content']}", self._saved))

    monkeypatch.setattr(EarlyRequest, "send", send)
    return log


def backend(pk: int, model: str = "Tiny-Chat-5M") -> Backend:
    return Backend(pk=pk, name=f"b{pk}", active_model=model)


def prompt_for(chosen: Backend) -> Prompt:
    return Prompt(turns=[{"role": "user", "content": chosen.active_model}])


def test_a_right_guess_is_kept(sent: list[tuple[str, Any]]) -> None:
    early = EarlyRequest()
    early.send(prompt_for(backend(1)), then=lambda: None, backend=backend(1))
    early.to(backend(1), prompt_for, then=lambda: None)
    assert [where for where, _ in sent] == ["b1/Tiny-Chat-5M"]
    assert not sent[0][1].done()
    answer: Any = object()
    early.saved(answer)
    assert sent[0][1].result() is answer


@pytest.mark.parametrize("claimed", [backend(2), backend(1, "Small-Chat-200M")])
def test_a_wrong_guess_is_withdrawn_and_the_request_sent_where_the_claim_says(sent: list[tuple[str, Any]], claimed: Backend) -> None:
    early = EarlyRequest()
    early.send(prompt_for(backend(1)), then=lambda: None, backend=backend(1))
    early.to(claimed, prompt_for, then=lambda: None)
    assert [where for where, _ in sent] == ["b1/Tiny-Chat-5M", f"{claimed.name}/{claimed.active_model}"]
    assert sent[0][1].result() is None  # the guessed request ends unseen
    assert not sent[1][1].done()


def test_a_guess_for_a_message_that_is_held_is_withdrawn(sent: list[tuple[str, Any]]) -> None:
    early = EarlyRequest()
    early.send(prompt_for(backend(1)), then=lambda: None, backend=backend(1))
    early.to(None, prompt_for, then=lambda: None)
    assert len(sent) == 1 and sent[0][1].result() is None
    assert early.backend is None


def test_rows_saved_after_the_caller_went_away_change_nothing(sent: list[tuple[str, Any]]) -> None:
    early = EarlyRequest()
    early.send(prompt_for(backend(1)), then=lambda: None, backend=backend(1))
    early.withdraw()  # the API request's caller went away while its question was being saved
    early.saved(object())  # type: ignore[arg-type]
    assert sent[0][1].result() is None


def test_without_a_guess_the_claim_sends_it(sent: list[tuple[str, Any]]) -> None:
    early = EarlyRequest()
    early.to(backend(3), prompt_for, then=lambda: None)
    assert [where for where, _ in sent] == ["b3/Tiny-Chat-5M"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("default_state", "default_active", "guessed"),
    [
        ("ready", "Tiny-Chat-5M", "default"),  # the default backend holds the default model: the first of equals
        ("switching", "", "second"),  # during its switch to Tiny, the other backend holding Tiny answers
        ("ready", "Small-Chat-200M", "default"),  # the default model is what the default backend holds
    ],
)
def test_the_guess_for_the_default_model_is_read_in_one_statement_as_the_claim_reads_it(
    default_state: str, default_active: str, guessed: str, django_assert_num_queries: Any
) -> None:
    Backend.objects.create(name="default", base_url="http://a", state=default_state, active_model=default_active, desired_model="Tiny-Chat-5M")
    Backend.objects.create(name="second", base_url="http://b", state="ready", active_model="Tiny-Chat-5M")
    Backend.objects.create(name="third", base_url="http://c", state="ready", active_model="Small-Chat-200M")
    with django_assert_num_queries(1):
        chosen = first_guess("")
    assert chosen is not None and chosen.name == guessed
    assert pick(model_for("")) == chosen  # what the claim picks
    assert first_guess("Small-Chat-200M") == pick("Small-Chat-200M") is not None
    assert first_guess("Large-Chat-1G") is None
