"""Gantry's OpenAI-compatible API against the model server directly, measured in one run: the same
streamed `/v1/chat/completions` request, with a personal key through Gantry (its queue, routing and
relay) and with the server's key straight to the model server, asked back to back in turns.

- time to first token added by Gantry (target <= 5 ms): the median of the differences within pairs of
  short answers
- tokens per second through Gantry against direct (target >= 0.97): the median of the ratios within pairs
  of greedy answers (`temperature: 0`: both sides generate the same tokens, so a pair differs only by the
  way it took), with the model server alone on one core and Gantry and the bench's client on the other, as
  a GPU leaves the CPU to Gantry in production; tokens are counted from the answer's `usage`, since the
  relay may send tokens that came together as one piece. The same with every process on both cores is
  printed too, for reference: there Gantry's relay takes turns on the model server's core.

The model server computes on one core (`cpu_threads: 1`), as in the chat benchmark.
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import httpx

from bench.common import median, report
from bench.site_bench import (
    FIRST_TOKEN_PAIRS,
    FIRST_TOKEN_TOKENS,
    MODEL,
    MODEL_CORE,
    QUESTION,
    ROUNDS,
    SITE_CORE,
    TOKENS,
    Run,
    after_a_pause,
    in_pairs,
    on_cores,
    percentile,
    summary,
)
from harness.site import MEMBER, Site, run_site
from harness.tabby_server import API_KEY, DEMO_MODELS, TabbyServer, run_tabby, wait_loaded

GREEDY_ROUNDS = 24


async def streamed(client: httpx.AsyncClient, url: str, headers: dict[str, str], tokens: int, greedy: bool = False) -> Run:
    """(time to first token, tokens per second, gaps between pieces) of one streamed chat completion at `url`:
    the tokens are those its `usage` counts, up to the last piece."""
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if greedy:
        body["temperature"] = 0
    started = time.perf_counter()
    stamps: list[float] = []
    counted: int | None = None
    last = ""
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            last = line or last
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                counted = int(chunk["usage"]["completion_tokens"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    first, _, gaps = summary(started, stamps)
    assert counted is not None, f"no usage in the stream of {url} ({len(stamps)} pieces; its last line: {last})"
    return first, counted / max(stamps[-1] - started, 1e-9) if stamps else 0.0, gaps


def personal_key(site: Site) -> str:
    with site.session(MEMBER) as session:
        made = session.post("/api/keys", json={"name": "bench"})
        assert made.status_code == 201, made.text
        return str(made.json()["key"])


async def measure(site: Site, tabby: TabbyServer) -> None:
    gantry = {"Authorization": f"Bearer {personal_key(site)}"}
    direct = {"x-api-key": API_KEY}
    async with httpx.AsyncClient(timeout=600) as client:

        def through(tokens: int, greedy: bool = False) -> Awaitable[Run]:
            return streamed(client, site.url, gantry, tokens, greedy)

        def straight(tokens: int, greedy: bool = False) -> Awaitable[Run]:
            return streamed(client, tabby.url, direct, tokens, greedy)

        for tokens in (FIRST_TOKEN_TOKENS, TOKENS):  # warm-up, both ways
            await through(tokens)
            await straight(tokens)
        firsts = await in_pairs(
            FIRST_TOKEN_PAIRS,
            lambda: after_a_pause(through(FIRST_TOKEN_TOKENS)),
            lambda: after_a_pause(straight(FIRST_TOKEN_TOKENS)),
        )
        shared = await in_pairs(ROUNDS, lambda: through(TOKENS, True), lambda: straight(TOKENS, True))
        with on_cores(tabby, site, bench_core=SITE_CORE):  # the model server alone on its core
            streams = await in_pairs(GREEDY_ROUNDS, lambda: through(TOKENS, True), lambda: straight(TOKENS, True))
    print(f"Streamed /v1/chat/completions through Gantry (personal key) vs the model server directly, {MODEL}:")
    first_token_figures(firsts)
    speed_figures(streams, shared)


def first_token_figures(firsts: list[tuple[Run, Run]]) -> None:
    firsts = [(g, d) for g, d in firsts if not math.isnan(g[0] - d[0])]  # an answer that ended at once has no first token
    added = sorted((g[0] - d[0]) * 1000 for g, d in firsts)
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
        f"{len(firsts)} pairs; quartiles {percentile(added, 25):.1f} / {percentile(added, 75):.1f} ms",
    )


def speed_figures(streams: list[tuple[Run, Run]], shared: list[tuple[Run, Run]]) -> None:
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
        f"{TOKENS} greedy tokens, {GREEDY_ROUNDS} pairs, the model server on core {MODEL_CORE} alone; "
        f"quartiles {percentile(ratios, 25):.3f} / {percentile(ratios, 75):.3f}",
    )
    everywhere = sorted(g[1] / d[1] for g, d in shared)
    report(
        "the same, every process on both cores (for reference)",
        median(everywhere),
        "",
        None,
        "",
        f"{ROUNDS} pairs; quartiles {percentile(everywhere, 25):.3f} / {percentile(everywhere, 75):.3f}",
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        config = {"model": {"model_name": MODEL}, "developer": {"cpu_threads": 1}}
        with run_tabby(Path(workdir) / "tabby", DEMO_MODELS, config=config) as tabby:
            wait_loaded(tabby, MODEL)
            with run_site(Path(workdir) / "site", tabby.url, extra_env={"GANTRY_MAX_ANSWER_TOKENS": str(TOKENS)}) as site:
                asyncio.run(measure(site, tabby))


if __name__ == "__main__":
    main()
