"""Chat during a model swap, in a real Chromium, with two people: an admin switches and unloads models on
the Admin Dashboard while a member chats. The member's messages are held ("Queued (#n)") under a banner
saying what is happening, then answered, in order, once the model is ready.

The model server is this module's own. It reads weights at 25 MB/s, so the switch to Small-Chat-200M
stays open about eight seconds, with real progress module by module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from harness.site import ADMIN, MEMBER, Site, run_site
from harness.tabby_server import TabbyServer, run_tabby, wait_loaded
from tests.e2e.conftest import TIMEOUT_MS, log_in

TINY = "Tiny-Chat-5M"
SMALL = "Small-Chat-200M"
SWITCH_TIMEOUT_MS = 60_000
ANSWER_TIMEOUT_MS = 90_000

# Records, for every answer, the lengths its text had while it was being generated, in the order the
# answers appeared.
RECORD_ANSWERS = """() => {
  window.__answers = {};
  window.__answerOrder = [];
  new MutationObserver(() => {
    for (const answer of document.querySelectorAll("#messages .message.assistant.generating")) {
      const lengths = window.__answers[answer.id] || (window.__answers[answer.id] = []);
      if (!window.__answerOrder.includes(answer.id)) window.__answerOrder.push(answer.id);
      const length = answer.querySelector(".body").textContent.length;
      if (lengths[lengths.length - 1] !== length) lengths.push(length);
    }
  }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def slow_disk_tabby(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TabbyServer]:
    config = {"model": {"model_name": TINY, "load_throttle_mbps": 25}, "developer": {"cpu_threads": 1}}
    with run_tabby(tmp_path_factory.mktemp("tabby"), demo_models, config=config) as server:
        wait_loaded(server, TINY)
        yield server


@pytest.fixture(scope="module")
def site(slow_disk_tabby: TabbyServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with run_site(tmp_path_factory.mktemp("site"), slow_disk_tabby.url, extra_env={"GANTRY_MAX_ANSWER_TOKENS": "24"}) as site:
        yield site


@pytest.fixture
def admin_page(browser: Browser, site: Site) -> Iterator[Page]:
    """The admin's browser, open beside the member's `page`."""
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    yield context.new_page()
    context.close()


def make_active(site: Site, model: str | None) -> None:
    with site.session(ADMIN) as admin:
        response = (
            admin.post("/api/admin/models/switch", json={"model_id": model}) if model else admin.post("/api/admin/models/unload")
        )
    assert response.status_code == 200, response.text


def open_models_tab(page: Page) -> None:
    log_in(page, ADMIN)
    page.goto("/admin/models/")
    expect(page.locator("#dashboard")).to_have_attribute("data-live", "true")  # the socket is open


def switch_on_dashboard(page: Page, model: str) -> None:
    page.locator(f'#model-rows tr[data-model="{model}"]').get_by_role("button", name="Switch").click()
    confirm(page, f"Switch to {model}? Chats hold new messages until it is loaded.")


def confirm(page: Page, question: str) -> None:
    dialog = page.locator("#confirm-dialog")
    expect(dialog.locator("#confirm-text")).to_have_text(question)
    dialog.get_by_role("button", name="Confirm").click()
    expect(dialog).to_be_hidden()


def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message")
    box.fill(text)
    box.press("Enter")
    expect(box).to_have_value("")  # accepted: the input is cleared only then


def saved_messages(site: Site, page: Page) -> list[dict[str, object]]:
    """The open conversation as the API gives it to the member."""
    conversation_id = re.fullmatch(r".*/c/(\d+)/", page.url)
    assert conversation_id, page.url
    with site.session(MEMBER) as member:
        response = member.get(f"/api/conversations/{conversation_id.group(1)}/messages/")
    assert response.status_code == 200
    return list(response.json())


def layout(messages: Locator) -> list[str]:
    """The page's messages, top to bottom, as their element ids."""
    return [str(e.get_attribute("id")) for e in messages.all()]


def test_messages_sent_during_a_switch_are_held_then_answered_in_order_and_the_banner_goes(
    page: Page, admin_page: Page, site: Site
) -> None:
    make_active(site, TINY)
    log_in(page, MEMBER)
    open_models_tab(admin_page)
    banner = page.locator("#model-banner")
    expect(banner).to_be_hidden()
    page.evaluate(RECORD_ANSWERS)

    switch_on_dashboard(admin_page, SMALL)
    expect(banner).to_have_text(re.compile(rf"Model loading\.\.\. \(Loading {SMALL}, \d+%\)"))
    for n in (1, 2, 3):
        send(page, f"Question {n}, asked during the switch")
    questions = page.locator("#messages .message.user")
    expect(questions.locator(".body")).to_have_text([f"Question {n}, asked during the switch" for n in (1, 2, 3)])
    expect(questions.locator(".status")).to_have_text(["Queued (#1)", "Queued (#2)", "Queued (#3)"])
    expect(banner).to_contain_text("Model loading...")  # still loading: all three were held

    answers = page.locator("#messages .message.assistant")
    expect(answers).to_have_count(3, timeout=SWITCH_TIMEOUT_MS)
    expect(answers).to_have_class([re.compile(r"\bdone\b")] * 3, timeout=ANSWER_TIMEOUT_MS)
    expect(banner).to_be_hidden()
    expect(page.locator("#model-name")).to_have_text(SMALL)
    expect(admin_page.locator("#progress-text")).to_have_text("✓ Model switched successfully!")
    expect(questions.locator(".status")).to_have_text(["", "", ""])

    saved = saved_messages(site, page)
    asked = [m for m in saved if m["role"] == "user"]
    answer_of = {m["reply_to"]: m for m in saved if m["role"] == "assistant"}
    expected = [element for q in asked for element in (f"message-{q['id']}", f"message-{answer_of[q['id']]['id']}")]
    assert layout(page.locator("#messages .message")) == expected  # each answer right under its question
    assert [(m["status"], m["model_name"]) for m in answer_of.values()] == [("done", SMALL)] * 3
    order: list[str] = page.evaluate("window.__answerOrder")
    assert order == [f"message-{answer_of[q['id']]['id']}" for q in asked]  # started in the order asked
    grown: dict[str, list[int]] = page.evaluate("window.__answers")
    assert all(len([n for n in grown[a] if n > 0]) >= 2 for a in order), f"An answer did not stream in: {grown}"


def test_after_an_unload_the_member_sees_model_not_available_and_the_next_switch_answers_the_held_message(
    page: Page, admin_page: Page, site: Site
) -> None:
    make_active(site, TINY)
    log_in(page, MEMBER)
    open_models_tab(admin_page)
    admin_page.get_by_role("button", name="Unload Model").click()
    confirm(admin_page, f"Unload {TINY}? Chats show 'Model not available' until you switch to a model.")

    banner = page.locator("#model-banner")
    expect(banner).to_have_text("Model not available", timeout=SWITCH_TIMEOUT_MS)
    expect(page.locator("#model-name")).to_have_text("No model loaded")
    send(page, "Is anyone there?")
    question = page.locator("#messages .message.user")
    expect(question.locator(".status")).to_have_text("Queued (#1)")
    expect(question.get_by_role("button", name="Cancel")).to_be_visible()
    expect(page.get_by_label("Message")).to_be_editable()  # the input stays usable meanwhile

    expect(admin_page.locator("#progress-text")).to_have_text("✓ Model unloaded")
    switch_on_dashboard(admin_page, TINY)
    answer = page.locator("#messages .message.assistant")
    expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=ANSWER_TIMEOUT_MS)
    expect(banner).to_be_hidden()
    expect(page.locator("#model-name")).to_have_text(TINY)
    expect(question.locator(".status")).to_have_text("")
    expect(question.get_by_role("button", name="Cancel")).to_have_count(0)
    saved = saved_messages(site, page)
    assert [(m["role"], m["status"]) for m in saved] == [("user", "done"), ("assistant", "done")]
    assert saved[1]["model_name"] == TINY


def test_a_queued_message_cancelled_from_the_page_is_stopped_and_never_answered(page: Page, site: Site) -> None:
    make_active(site, None)
    log_in(page, MEMBER)
    expect(page.locator("#model-banner")).to_have_text("Model not available")
    send(page, "Forget this one")
    send(page, "But answer this one")
    forgotten, kept = page.locator("#messages .message.user").all()
    expect(forgotten.locator(".status")).to_have_text("Queued (#1)")
    expect(kept.locator(".status")).to_have_text("Queued (#2)")

    forgotten.get_by_role("button", name="Cancel").click()
    expect(forgotten).to_have_class(re.compile(r"\bcancelled\b"))
    expect(forgotten.locator(".status")).to_have_text("Stopped")
    expect(forgotten.get_by_role("button", name="Cancel")).to_have_count(0)
    expect(forgotten.get_by_role("button", name="Retry")).to_be_visible()
    expect(kept.locator(".status")).to_have_text("Queued (#1)")  # it moved up

    make_active(site, TINY)
    answer = page.locator("#messages .message.assistant")
    expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=ANSWER_TIMEOUT_MS)
    expect(answer).to_have_count(1)
    kept_id = kept.get_attribute("id")
    assert page.evaluate("(id) => document.getElementById(id).nextElementSibling.classList.contains('assistant')", kept_id)
    page.reload()
    expect(page.locator("#messages .message.user .status")).to_have_text(["Stopped", ""])
    saved = saved_messages(site, page)
    assert [(m["role"], m["content"], m["status"]) for m in saved[:2]] == [
        ("user", "Forget this one", "cancelled"),
        ("user", "But answer this one", "done"),
    ]
    assert [(m["role"], m["status"], m["reply_to"]) for m in saved[2:]] == [("assistant", "done", saved[1]["id"])]
