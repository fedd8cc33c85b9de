"""The OpenAI-compatible API in production mode: Redis's channel layer and PostgreSQL, two daphne
processes. A key made through one process opens the API on both; each answers streamed and not, and
a request's rows are gone once it ends."""

from __future__ import annotations

import openai

from harness.site import MEMBER
from tests.gateway.live import make_key
from tests.models_admin.live import query, wait_until
from tests.production.conftest import ProductionSite

ASK = [{"role": "user", "content": "Hello there"}]


def test_both_web_processes_answer_the_api(production: ProductionSite) -> None:
    site = production.site
    key = make_key(site, MEMBER)[1]
    for url in (site.url, production.other_url):
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0)
        assert [m.id for m in client.models.list()] == ["Tiny-Chat-5M"]
        whole = client.chat.completions.create(model="Tiny-Chat-5M", messages=ASK, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        assert whole.choices[0].message.content and whole.usage is not None and whole.usage.completion_tokens > 0
        chunks = list(
            client.chat.completions.create(
                model="Tiny-Chat-5M", messages=ASK, max_tokens=8, temperature=0, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    wait_until(lambda: not query(site, "SELECT id FROM chat_conversation WHERE source = 'api'"), 10, "the requests' rows to go")
