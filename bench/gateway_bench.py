"""Gantry's OpenAI-compatible API against the model server directly, measured in one run: the same
streamed `/v1/chat/completions` request, with a personal key through Gantry (its queue, routing and
relay) and with the server's key straight to the model server, asked back to back in turns.

- time to first token added by Gantry (target <= 5 ms): the median of the differences within pairs of
  short answers
- tokens per second through Gantry against direct (target >= 0.97): the median of the ratios within pairs

The model server computes on one core (`cpu_threads: 1`), as in the chat benchmark.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import median, report
from bench.site_bench import (
    FIRST_TOKEN_PAIRS,
    FIRST_TOKEN_TOKENS,
    MODEL,
    QUESTION,
    ROUNDS,
    TOKENS,
    Run,
    after_a_pause,
    in_pairs,
    percentile,
    summary,
)
from harness.site import MEMBER, Site, run_site
from harness.tabby_server import API_KEY, DEMO_MODELS, run_tabby, wait_loaded


async def streamed(client: httpx.AsyncClient, url: str, headers: dict[str, str], tokens: int) -> Run:
    """(time to first piece, pieces per second, gaps) of one streamed chat completion at `url`."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens, "stream": True}
    started = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return summary(started, stamps)


def personal_key(site: Site) -> str:
    with site.session(MEMBER) as session:
        made = session.post("/api/keys", json={"name": "bench"})
        assert made.status_code == 201, made.text
        return str(made.json()["key"])


async def measure(site: Site, tabby_url: str) -> None:
    gantry = {"Authorization": f"Bearer {personal_key(site)}"}
    direct = {"x-api-key": API_KEY}
    async with httpx.AsyncClient(timeout=600) as client:
        for tokens in (FIRST_TOKEN_TOKENS, TOKENS):  # warm-up, both ways
            await streamed(client, site.url, gantry, tokens)
            await streamed(client, tabby_url, direct, tokens)
        firsts = await in_pairs(
            FIRST_TOKEN_PAIRS,
            lambda: after_a_pause(streamed(client, site.url, gantry, FIRST_TOKEN_TOKENS)),
            lambda: after_a_pause(streamed(client, tabby_url, direct, FIRST_TOKEN_TOKENS)),
        )
        streams = await in_pairs(
            ROUNDS, lambda: streamed(client, site.url, gantry, TOKENS), lambda: streamed(client, tabby_url, direct, TOKENS)
        )
    added = sorted((g[0] - d[0]) * 1000 for g, d in firsts)
    print(f"Streamed /v1/chat/completions through Gantry (personal key) vs the model server directly, {MODEL}:")
    report(
        "time to first token through Gantry's API",
        median([g[0] * 1000 for g, _ in firsts]),
        "ms",
        median([d[0] * 1000 for _, d in firsts]),
    )
    report(
        "time to first token added by Gantry's API (median of pairs)",
        median(added),
        "ms",
        None,
        "<= 5 ms",
        f"{FIRST_TOKEN_PAIRS} pairs; quartiles {percentile(added, 25):.1f} / {percentile(added, 75):.1f} ms",
    )
    ratios = sorted(g[1] / d[1] for g, d in streams)
    report(
        "tokens/s through Gantry's API (medians)", median([g[1] for g, _ in streams]), "tok/s", median([d[1] for _, d in streams])
    )
    report(
        "tokens/s through Gantry's API / direct (median of pairs)",
        median(ratios),
        "",
        None,
        ">= 0.97",
        f"{TOKENS} tokens, {ROUNDS} pairs; quartiles {percentile(ratios, 25):.3f} / {percentile(ratios, 75):.3f}",
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        config = {"model": {"model_name": MODEL}, "developer": {"cpu_threads": 1}}
        with run_tabby(Path(workdir) / "tabby", DEMO_MODELS, config=config) as tabby:
            wait_loaded(tabby, MODEL)
            with run_site(Path(workdir) / "site", tabby.url, extra_env={"GANTRY_MAX_ANSWER_TOKENS": str(TOKENS)}) as site:
                asyncio.run(measure(site, tabby.url))


if __name__ == "__main__":
    main()
