"""Usage in production mode (PostgreSQL, Redis, two daphne processes): requests answered at once by both
processes all count, each once, with the model server's token counts; both processes serve the same
counters in /metrics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from harness.site import ADMIN, MEMBER
from tests.conftest import TINY
from tests.figures import scrape
from tests.gateway.live import make_key
from tests.production.conftest import ProductionSite

ASK = [{"role": "user", "content": "Hello there"}]
REQUESTS = 12


def test_requests_answered_at_once_by_two_processes_all_count(production: ProductionSite) -> None:
    site = production.site
    key = make_key(site, MEMBER)[1]
    clients = [
        openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) for url in (site.url, production.other_url)
    ]

    def ask(n: int) -> openai.types.CompletionUsage:
        answer = clients[n % 2].chat.completions.create(model=TINY, messages=ASK, max_tokens=4 + n % 5)  # type: ignore[arg-type]
        assert answer.usage is not None
        return answer.usage

    with site.session(ADMIN) as admin:
        before = scrape(admin)
        with ThreadPoolExecutor(max_workers=REQUESTS) as pool:
            usages = list(pool.map(ask, range(REQUESTS)))
        report = admin.get("/api/admin/usage?days=1").json()
        first = scrape(admin)
    with httpx.Client(base_url=production.other_url, timeout=60) as other:
        assert other.post("/api/auth/login", json={"username": ADMIN[0], "password": ADMIN[1]}).status_code == 200
        second = scrape(other)

    labels = {"user": MEMBER[0], "model": TINY}
    row = next(row for row in report["rows"] if (row["user"], row["model"]) == (MEMBER[0], TINY))
    completion = sum(usage.completion_tokens for usage in usages)
    assert completion == sum(4 + n % 5 for n in range(REQUESTS))
    assert (
        row["requests"]
        == first.get("gantry_usage_requests_total", **labels)
        == REQUESTS + before.get("gantry_usage_requests_total", **labels)
    )
    assert row["completion_tokens"] - before.get("gantry_usage_completion_tokens_total", **labels) == completion
    assert row["prompt_tokens"] - before.get("gantry_usage_prompt_tokens_total", **labels) == sum(u.prompt_tokens for u in usages)
    for name in ("requests", "prompt_tokens", "completion_tokens", "hold_seconds", "generation_seconds"):
        assert second.get(f"gantry_usage_{name}_total", **labels) == first.get(f"gantry_usage_{name}_total", **labels)
