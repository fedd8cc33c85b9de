"""The chat page in a real Chromium: logging in, live answers, the sidebar, the profile menu, safe rendering."""

from __future__ import annotations

import re

from playwright.sync_api import Dialog, Page, WebSocketRoute, expect

from harness.site import ADMIN, MEMBER, Site
from tests.e2e.conftest import log_in

ANSWER_TIMEOUT_MS = 60_000

# Records the rendered length of every answer each time it changes while it is still being generated.
RECORD_GROWTH = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const answer = document.querySelector("#messages .message.assistant.generating .body");
    if (answer) window.__lengths.push(answer.textContent.length);
  }).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true, attributes: true});
}"""


def growth_steps(page: Page) -> tuple[int, list[int]]:
    """How many times the answer grew while still generating (from nothing), and the lengths seen."""
    lengths: list[int] = page.evaluate("window.__lengths")
    return sum(1 for before, after in zip([0, *lengths], lengths) if after > before), lengths


def make_conversation(site: Site, title: str, question: str, answer: str) -> int:
    """Store a finished exchange for `member` straight in the site's database."""
    code = f"""
from django.contrib.auth import get_user_model
from chat.models import Conversation, Message
member = get_user_model().objects.get(username="member")
conversation = Conversation.objects.create(owner=member, title={title!r})
question = Message.objects.create(conversation=conversation, role="user", content={question!r}, status="done")
Message.objects.create(conversation=conversation, role="assistant", content={answer!r}, status="done", reply_to=question)
print(conversation.pk)
"""
    return int(site.manage("shell", "-c", code).split()[-1])


def test_an_answer_streams_in_and_stays_after_a_reload(page: Page) -> None:
    log_in(page, MEMBER)
    page.evaluate(RECORD_GROWTH)
    page.get_by_label("Message").fill("Tell me about gantry cranes")
    page.get_by_label("Message").press("Enter")

    answer = page.locator("#messages .message.assistant")
    expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=ANSWER_TIMEOUT_MS)
    steps, lengths = growth_steps(page)
    assert steps >= 2, f"The answer did not grow while being generated; lengths seen: {lengths}"
    full_answer = answer.locator(".body").text_content() or ""
    assert full_answer.strip()
    expect(page).to_have_url(re.compile(r"/c/\d+/$"))
    expect(page.get_by_label("Message")).to_have_value("")

    page.reload()
    expect(page.locator("#messages .message.user")).to_have_text("Tell me about gantry cranes")
    expect(page.locator("#messages .message.assistant .body")).to_have_text(full_answer)
    expect(page.locator("#conversation-list .conversation-item.active .conversation-link")).to_have_text(
        "Tell me about gantry cranes"
    )

    page.locator("#profile-button").click()
    page.get_by_role("menuitem", name="Log out").click()
    expect(page).to_have_url("/login/")
    expect(page.get_by_role("heading", name="Log in to Gantry")).to_be_visible()


def test_shift_enter_starts_a_new_line_instead_of_sending(page: Page) -> None:
    log_in(page, MEMBER)
    box = page.get_by_label("Message")
    box.press_sequentially("first line")
    box.press("Shift+Enter")
    box.press_sequentially("second line")
    expect(box).to_have_value("first line\nsecond line")
    expect(page).to_have_url("/")

    box.press("Enter")
    expect(page.locator("#messages .message.user")).to_have_count(1)
    expect(page.locator("#messages .message.user .body")).to_have_js_property("textContent", "first line\nsecond line")
    # Let the answer finish, so the model server is free for the next test.
    expect(page.locator("#messages .message.assistant")).to_have_class(re.compile(r"\bdone\b"), timeout=ANSWER_TIMEOUT_MS)


def test_a_conversation_is_renamed_and_deleted_from_the_sidebar(page: Page, site: Site) -> None:
    conversation_id = make_conversation(site, "Trip plans", "Where to?", "Somewhere warm.")
    log_in(page, MEMBER)
    item = page.locator(f'#conversation-list .conversation-item[data-id="{conversation_id}"]')
    expect(item.locator(".conversation-link")).to_have_text("Trip plans")

    prompts: list[tuple[str, str]] = []

    def rename(dialog: Dialog) -> None:
        prompts.append((dialog.message, dialog.default_value))
        dialog.accept("Packing list")

    page.once("dialog", rename)
    item.hover()
    item.get_by_role("button", name="Rename").click()
    expect(item.locator(".conversation-link")).to_have_text("Packing list")
    assert prompts == [("Rename conversation", "Trip plans")]
    page.reload()
    expect(item.locator(".conversation-link")).to_have_text("Packing list")

    item.locator(".conversation-link").click()
    expect(page).to_have_url(f"/c/{conversation_id}/")
    expect(page.locator("#messages .message.assistant")).to_have_text("Somewhere warm.")
    page.once("dialog", lambda dialog: dialog.accept())
    item.get_by_role("button", name="Delete").click()
    expect(page).to_have_url("/")
    expect(item).to_have_count(0)
    gone = page.goto(f"/c/{conversation_id}/")
    assert gone is not None and gone.status == 404


def test_cancelling_the_delete_dialog_keeps_the_conversation(page: Page, site: Site) -> None:
    conversation_id = make_conversation(site, "Keep me", "Still here?", "Yes.")
    log_in(page, MEMBER)
    item = page.locator(f'#conversation-list .conversation-item[data-id="{conversation_id}"]')
    page.once("dialog", lambda dialog: dialog.dismiss())
    item.hover()
    item.get_by_role("button", name="Delete").click()
    page.reload()
    expect(item.locator(".conversation-link")).to_have_text("Keep me")


def test_the_profile_menu_names_the_member_without_an_admin_entry(page: Page) -> None:
    log_in(page, MEMBER)
    menu = page.locator("#profile-menu")
    expect(menu).to_be_hidden()
    page.locator("#profile-button").click()
    expect(menu).to_be_visible()
    expect(menu.locator(".profile-name")).to_have_text("member")
    expect(menu.get_by_role("menuitem", name="Log out")).to_be_visible()
    expect(menu.get_by_role("menuitem", name="Admin Dashboard")).to_have_count(0)
    page.keyboard.press("Escape")
    expect(menu).to_be_hidden()


def test_the_profile_menu_offers_the_admin_dashboard_to_the_admin(page: Page) -> None:
    log_in(page, ADMIN)
    page.locator("#profile-button").click()
    menu = page.locator("#profile-menu")
    expect(menu.locator(".profile-name")).to_contain_text("admin")
    expect(menu.get_by_role("menuitem", name="Log out")).to_be_visible()
    menu.get_by_role("menuitem", name="Admin Dashboard").click()
    expect(page).to_have_url("/admin/models/")
    expect(page.get_by_role("heading", name="Admin Dashboard")).to_be_visible()


def test_markdown_in_answers_is_rendered_without_running_anything(page: Page, site: Site) -> None:
    question = 'Is <b>this</b> bold? <img src=x onerror="window.__pwned = 3">'
    answer = (
        "Here is **bold** text.\n\n"
        "<script>window.__pwned = 1</script>\n\n"
        '<img src=x onerror="window.__pwned = 2">\n\n'
        "A [link](javascript:alert(1)) and a [real one](https://example.org/docs).\n\n"
        "```python\nprint('<hi>')\n```\n\nThat is all."
    )
    conversation_id = make_conversation(site, "Unsafe markdown", question, answer)
    log_in(page, MEMBER)
    page.goto(f"/c/{conversation_id}/")

    reply = page.locator("#messages .message.assistant .body")
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("pre > code")).to_have_text("print('<hi>')")
    expect(reply.locator("pre + p")).to_have_js_property("innerHTML", "That is all.")
    expect(reply).to_contain_text("<script>window.__pwned = 1</script>")
    expect(reply).to_contain_text('<img src=x onerror="window.__pwned = 2">')
    expect(reply).to_contain_text("[link](javascript:alert(1))")
    expect(reply.locator("a")).to_have_count(1)
    expect(reply.locator("a")).to_have_attribute("href", "https://example.org/docs")
    expect(page.locator("#messages script, #messages img")).to_have_count(0)
    expect(page.locator('#messages [href^="javascript:" i]')).to_have_count(0)

    mine = page.locator("#messages .message.user .body")
    expect(mine).to_have_text(question)
    expect(mine.locator("b")).to_have_count(0)
    assert page.evaluate("typeof window.__pwned") == "undefined"


def test_a_too_long_message_is_refused_and_kept_in_the_input(page: Page) -> None:
    log_in(page, MEMBER)
    text = "x" * 32_001
    box = page.get_by_label("Message")
    box.fill(text)
    box.press("Enter")
    expect(page.locator("#composer-error")).to_have_text(
        "This message has 32,001 characters; the limit is 32,000. Shorten it and send again."
    )
    expect(page.locator("#composer-error")).to_be_visible()
    expect(box).to_have_value(text)
    expect(page.locator("#messages .message")).to_have_count(0)
    error_box = page.locator("#composer-error").bounding_box()
    input_box = box.bounding_box()
    assert error_box and input_box and error_box["y"] + error_box["height"] <= input_box["y"]


def test_an_answer_streams_in_even_when_the_socket_opens_slowly(page: Page) -> None:
    log_in(page, MEMBER)

    def open_slowly(socket: WebSocketRoute) -> None:
        page.wait_for_timeout(1_000)  # a slow network, not a wait for anything
        socket.connect_to_server()

    page.route_web_socket(re.compile(r"/ws/chat/\d+/$"), open_slowly)
    page.evaluate(RECORD_GROWTH)
    page.get_by_label("Message").fill("Hello over a slow line")
    page.get_by_label("Message").press("Enter")

    expect(page.locator("#messages .message.assistant")).to_have_class(re.compile(r"\bdone\b"), timeout=ANSWER_TIMEOUT_MS)
    steps, lengths = growth_steps(page)
    assert steps >= 2, f"The answer did not stream in; lengths seen: {lengths}"


def test_the_page_sends_its_message_over_its_socket(page: Page) -> None:
    log_in(page, MEMBER)
    frames: list[str] = []
    posts: list[str] = []
    page.on("websocket", lambda socket: socket.on("framesent", lambda payload: frames.append(str(payload))))
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.get_by_label("Message").fill("Sent over the socket")
    page.get_by_label("Message").press("Enter")

    expect(page.locator("#messages .message.assistant")).to_have_class(re.compile(r"\bdone\b"), timeout=ANSWER_TIMEOUT_MS)
    sent = [frame for frame in frames if '"chat.send"' in frame]
    assert len(sent) == 1 and "Sent over the socket" in sent[0]
    assert not [url for url in posts if url.endswith("/messages/")]  # only the new conversation was POSTed
    expect(page.get_by_label("Message")).to_have_value("")


def test_without_its_socket_the_page_posts_the_message_and_the_answer_is_there_after_a_reload(page: Page) -> None:
    log_in(page, MEMBER)
    # The conversation's socket is refused every time (a proxy that drops WebSockets, say).
    page.route_web_socket(re.compile(r"/ws/chat/\d+/$"), lambda socket: socket.close(code=1011))
    posts: list[str] = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.get_by_label("Message").fill("Sent without a socket")
    page.get_by_label("Message").press("Enter")

    expect(page.locator("#messages .message.user")).to_have_text("Sent without a socket")
    expect(page.get_by_label("Message")).to_have_value("")
    assert [url for url in posts if url.endswith("/messages/")]
    answer = page.locator("#messages .message.assistant.done")
    for _ in range(30):  # no live updates without the socket: reload until the answer is saved
        page.reload()
        if answer.count():
            break
        page.wait_for_timeout(1_000)
    expect(answer).to_have_count(1)
    expect(answer.locator(".body")).not_to_be_empty()
