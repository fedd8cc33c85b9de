"""The Admin Dashboard's Usage tab in a real Chromium, after real answers (chat messages and a request of
the OpenAI-compatible API): the totals, the table per user and model, the chart of each day's tokens, and
another period picked; nothing is loaded from outside the site."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from harness.site import ADMIN, MEMBER, OUTSIDER, Site
from tests.conftest import TINY
from tests.e2e.conftest import log_in
from tests.gateway.live import make_key, openai_client
from tests.models_admin.live import query, wait_until


def answered(site: Site, user: tuple[str, str], questions: list[str]) -> None:
    """Chat messages of `user`, each in a conversation of its own, answered."""
    with site.session(user) as client:
        ids = []
        for content in questions:
            conversation = client.post("/api/conversations/", json={}).json()["id"]
            response = client.post(f"/api/conversations/{conversation}/messages/", json={"content": content})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
    marks = ",".join("?" * len(ids))
    sql = f"SELECT status FROM chat_message WHERE reply_to_id IN ({marks})"
    wait_until(lambda: [row["status"] for row in query(site, sql, *ids)] == ["done"] * len(ids), 60, "the answers")


@pytest.fixture(scope="module")
def usage(site: Site) -> dict[str, Any]:
    """Two chat answers for the member, one API request for the outsider; the month's report."""
    answered(site, MEMBER, ["Tell me about cranes.", "What is a gantry?"])
    client = openai_client(site, make_key(site, OUTSIDER)[1])
    client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Name a color."}], max_tokens=10)  # type: ignore[list-item]
    with site.session(ADMIN) as admin:
        return dict(admin.get("/api/admin/usage?days=30").json())


def row_of(report: dict[str, Any], user: str) -> dict[str, Any]:
    return next(row for row in report["rows"] if (row["user"], row["model"]) == (user, TINY))


def test_the_usage_tab_says_when_nothing_was_answered(page: Page) -> None:
    """Before any answer (this module's site is new; the next test makes the answers)."""
    log_in(page, ADMIN)
    page.goto("/admin/usage/")
    expect(page.locator("#usage-empty")).to_have_text("No answers in this period. Usage is counted as each answer ends.")
    expect(page.locator("#usage-chart .chart-empty")).to_have_text("No tokens in this period")
    expect(page.locator("#usage-chart svg g.day")).to_have_count(30)
    expect(page.locator("#usage-chart rect.bar")).to_have_count(0)
    expect(page.locator('[data-total="requests"]')).to_have_text("0")
    expect(page.locator('[data-total="hold_seconds"]')).to_have_text("0 s")
    expect(page.locator("tr.usage-row")).to_have_count(0)


def test_the_usage_tab_shows_the_table_and_the_chart(page: Page, site: Site, usage: dict[str, Any]) -> None:
    elsewhere: list[str] = []
    page.on("request", lambda request: None if request.url.startswith(site.url) else elsewhere.append(request.url))
    log_in(page, ADMIN)
    page.goto("/admin/")
    page.get_by_role("link", name="Usage").click()
    expect(page).to_have_url("/admin/usage/")
    expect(page.get_by_role("link", name="Usage")).to_have_attribute("aria-current", "page")
    expect(page.get_by_label("Period")).to_have_value("30")

    totals = usage["totals"]
    expect(page.locator('[data-total="requests"]')).to_have_text(f"{totals['requests']:,}")
    expect(page.locator('[data-total="completion_tokens"]')).to_have_text(f"{totals['completion_tokens']:,}")
    assert totals["requests"] == 3
    for user, requests in ((MEMBER[0], 2), (OUTSIDER[0], 1)):
        row = row_of(usage, user)
        shown = page.locator(f'tr.usage-row[data-user="{user}"][data-model="{TINY}"]')
        expect(shown.locator(".requests")).to_have_text(str(requests))
        expect(shown.locator(".prompt-tokens")).to_have_text(f"{row['prompt_tokens']:,}")
        expect(shown.locator(".completion-tokens")).to_have_text(f"{row['completion_tokens']:,}")
        expect(shown.locator(".generation")).to_contain_text("per request")
    expect(page.locator("#usage-empty")).to_be_hidden()
    expect(page.locator("#usage-chart .chart-empty")).to_have_count(0)

    # Thirty days, today's bar the only one, its two parts in proportion to its tokens.
    days = page.locator("#usage-chart svg g.day")
    expect(days).to_have_count(30)
    today = page.locator(f'#usage-chart g.day[data-day="{date.fromisoformat(usage["until"]).isoformat()}"]')
    expect(today.locator("rect.bar")).to_have_count(2)
    expect(page.locator("#usage-chart rect.bar")).to_have_count(2)
    expect(today.locator("title")).to_contain_text(f"{totals['completion_tokens']:,} completion tokens, 3 requests")
    prompt = float(today.locator("rect.bar.prompt").get_attribute("height") or 0)
    completion = float(today.locator("rect.bar.completion").get_attribute("height") or 0)
    assert prompt / completion == pytest.approx(totals["prompt_tokens"] / totals["completion_tokens"], rel=0.02)

    page.get_by_label("Period").select_option(label="Today")
    expect(days).to_have_count(1)
    expect(page).to_have_url("/admin/usage/?days=1")
    expect(page.locator('[data-total="requests"]')).to_have_text("3")
    expect(page.locator("#usage-range")).to_contain_text("Today")
    page.reload()
    expect(page.get_by_label("Period")).to_have_value("1")
    expect(days).to_have_count(1)
    assert elsewhere == []


def test_members_cannot_open_the_usage_tab(page: Page) -> None:
    log_in(page, MEMBER)
    page.goto("/admin/usage/")
    expect(page).to_have_url("/login/?next=/admin/usage/")
    expect(page.locator("#usage-page")).to_have_count(0)
