"""Gantry's chat path against streaming from the model server directly, measured in one run.

A page sends its message over its conversation's socket and reads the answer from it; the direct
baseline asks the model server's /v1/chat/completions and reads its SSE stream.

- time to first token through Gantry's WebSocket minus direct (target <= 10 ms): the median of the
  differences within pairs of one Gantry and one direct answer asked back to back (in turns, which goes
  first), short answers so that many pairs fit; a slow moment of the machine then slows both sides of
  a pair, not one median
- tokens per second through Gantry against direct (target >= 0.95): the median of the ratios within
  pairs asked back to back (in turns), as the machine's speed drifts from one minute to the next
- 100 simultaneous chats on one daphne process: all complete; the inter-token latency Gantry adds
  at p50 and p99 (target p99 <= 50 ms: Gantry's gaps minus those of 100 simultaneous direct streams),
  with the model server and the bench's client on one core and daphne alone on the other; Gantry's CPU
  per relayed token (daphne's CPU time over the crowd / the tokens of the answers)

The model server computes on one core (`cpu_threads: 1`), leaving the other to the site and the
bench's client, as a GPU leaves the CPU to them in production: a prompt's prefill of the CPU engine
takes every core it has, and any work beside it (the site's, the client's) would lengthen the prefill
itself. The first-token figure with the model server on every core is printed too, for reference.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import websockets
from tokenizers import Tokenizer

from bench.common import cpu_seconds, median, pin, report
from harness.site import MEMBER, Site, run_site
from harness.tabby_server import API_KEY, DEMO_MODELS, TabbyServer, run_tabby, wait_loaded

MODEL = "Small-Chat-200M"
TINY = "Tiny-Chat-5M"
TOKENS = 64
ROUNDS = 15
FIRST_TOKEN_TOKENS = 4
FIRST_TOKEN_PAIRS = 150
SHARED_CORES_PAIRS = 40
PAUSE = 0.3  # seconds before each first-token measurement
MODEL_THREADS = 1
CROWD = 100
CROWD_TOKENS = 24
MODEL_CORE, SITE_CORE = 0, 1
T = TypeVar("T")
Run = tuple[float, float, list[float]]  # time to first piece, pieces per second, gaps between pieces
QUESTION = "Describe what a Python package is, in a few sentences."


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def direct(tabby: TabbyServer, client: httpx.AsyncClient, tokens: int) -> Run:
    """(time to first token, pieces per second, gaps between pieces) straight from the model server."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens, "stream": True}
    started = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", tabby.url + "/v1/chat/completions", json=body, headers={"x-api-key": API_KEY}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return summary(started, stamps)


def summary(started: float, stamps: list[float]) -> Run:
    """(time to first piece, pieces per second, gaps); an answer that ended at once has no pieces."""
    if not stamps:
        return float("nan"), 0.0, []
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - started, len(stamps) / max(stamps[-1] - started, 1e-9), gaps


async def through_gantry(
    site: Site, client: httpx.AsyncClient, cookie: str, texts: list[str] | None = None, crowd: Crowd | None = None
) -> Run:
    """As a page does: the message over the conversation's socket, the answer from it (its text added to
    `texts`). A token event may carry several pieces that came together: its gap is the one counted. In
    a `crowd`, the message goes once every page of the crowd is open, as a hundred people who have their
    pages open send at about the same time."""
    conversation = (await client.post(site.url + "/api/conversations/", json={})).json()
    url = site.url.replace("http://", "ws://") + f"/ws/chat/{conversation['id']}/"
    async with websockets.connect(url, additional_headers={"Cookie": cookie, "Origin": site.url}) as socket:
        await socket.recv()  # model.state
        if crowd is not None:
            await crowd.all_open()
        started = time.perf_counter()
        await socket.send(json.dumps({"type": "chat.send", "content": QUESTION, "ref": 1}))
        stamps: list[float] = []
        pieces: list[str] = []
        while True:
            event = json.loads(await socket.recv())
            if event["type"] == "chat.token":
                stamps.append(time.perf_counter())
                pieces.append(event["text"])
            elif event["type"] == "chat.refused":
                raise AssertionError(event["detail"])
            elif event["type"] == "chat.done":
                assert event["status"] == "done", event
                break
    if texts is not None:
        texts.append("".join(pieces))
    return summary(started, stamps)


class Crowd:
    """Pages that send their messages together, once all of them are open."""

    def __init__(self, size: int) -> None:
        self.size, self.open = size, 0
        self.ready = asyncio.Event()
        self.opened_at = 0.0

    async def all_open(self) -> None:
        self.open += 1
        if self.open == self.size:
            self.opened_at = time.perf_counter()
            self.ready.set()
        await self.ready.wait()


async def logged_in(site: Site, user: tuple[str, str] = MEMBER) -> tuple[httpx.AsyncClient, str]:
    client = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=200))
    await client.__aenter__()
    response = await client.post(site.url + "/api/auth/login", json={"username": user[0], "password": user[1]})
    assert response.status_code == 200
    return client, f"session_id={client.cookies['session_id']}"


async def after_a_pause(asking: Awaitable[T]) -> T:
    """A message asked after the last answer's aftermath (its saves and events) has settled, as a person's next
    message is: short answers end so fast that the next one would otherwise meet it."""
    await asyncio.sleep(PAUSE)
    return await asking


async def in_pairs(rounds: int, gantry: Callable[[], Awaitable[Run]], plain: Callable[[], Awaitable[Run]]) -> list[tuple[Run, Run]]:
    """One answer through Gantry and one direct a round, back to back, in turns which goes first."""
    measured = []
    for n in range(rounds):
        if n % 2:
            first = await gantry()
            measured.append((first, await plain()))
        else:
            first = await plain()
            measured.append((await gantry(), first))
    return measured


async def first_tokens(tabby: TabbyServer, site: Site, pairs: int = FIRST_TOKEN_PAIRS, how: str = "") -> None:
    client, cookie = await logged_in(site)
    try:
        await direct(tabby, client, FIRST_TOKEN_TOKENS)
        await through_gantry(site, client, cookie)  # warm-up
        runs = await in_pairs(
            pairs,
            lambda: after_a_pause(through_gantry(site, client, cookie)),
            lambda: after_a_pause(direct(tabby, client, FIRST_TOKEN_TOKENS)),
        )
    finally:
        await client.aclose()
    measured = [(gantry[0] * 1000, plain[0] * 1000) for gantry, plain in runs]
    print(f"First token through Gantry (WebSocket) vs the model server directly, {MODEL}, {pairs} pairs{how}:")
    report("time to first token through Gantry", median([g for g, _ in measured]), "ms", median([d for _, d in measured]))
    added = sorted(g - d for g, d in measured)
    report(
        "time to first token added by Gantry (median of pairs)", median(added), "ms", None, "<= 10 ms" if not how else "",
        f"quartiles {percentile(added, 25):.1f} / {percentile(added, 75):.1f} ms",
    )


async def single_streams(tabby: TabbyServer, site: Site) -> None:
    client, cookie = await logged_in(site)
    try:
        await direct(tabby, client, TOKENS)
        await through_gantry(site, client, cookie)  # warm-up
        runs = await in_pairs(ROUNDS, lambda: through_gantry(site, client, cookie), lambda: direct(tabby, client, TOKENS))
    finally:
        await client.aclose()
    measured = [(gantry[1], plain[1]) for gantry, plain in runs]
    ratios = sorted(g / d for g, d in measured)
    print(f"Streaming through Gantry (WebSocket) vs the model server directly, {MODEL}, {TOKENS} tokens, {ROUNDS} pairs:")
    report("tokens/s through Gantry (medians)", median([g for g, _ in measured]), "tok/s", median([d for _, d in measured]))
    report(
        "tokens/s through Gantry / direct (median of pairs)", median(ratios), "", None, ">= 0.95",
        f"quartiles {percentile(ratios, 25):.3f} / {percentile(ratios, 75):.3f}",
    )


async def crowd(tabby: TabbyServer, site: Site, daphne: int) -> None:
    """100 chats at once through Gantry against 100 streams at once straight from the model server, the
    model server on one core and daphne alone on the other (the bench's client beside the model server,
    so it slows both sides alike): the gaps between pieces say what Gantry adds, and daphne's CPU time
    what it costs."""
    client, cookie = await logged_in(site)
    texts: list[str] = []
    try:
        started = time.perf_counter()
        direct_runs = await asyncio.gather(*(direct(tabby, client, CROWD_TOKENS) for _ in range(CROWD)))
        direct_time = time.perf_counter() - started
        spent = cpu_seconds(daphne)
        together = Crowd(CROWD)
        gantry_runs = await asyncio.gather(*(through_gantry(site, client, cookie, texts, together) for _ in range(CROWD)))
        gantry_time = time.perf_counter() - together.opened_at
        spent = cpu_seconds(daphne) - spent
    finally:
        await client.aclose()
    direct_gaps = [g * 1000 for run in direct_runs for g in run[2]]
    gantry_gaps = [g * 1000 for run in gantry_runs for g in run[2]]
    tokenizer = Tokenizer.from_file(str(DEMO_MODELS / TINY / "tokenizer.json"))
    tokens = sum(len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts)
    print(f"{CROWD} simultaneous chats on one daphne process ({TINY}, up to {CROWD_TOKENS} tokens each; model server on core")
    print(f"{MODEL_CORE}, daphne alone on core {SITE_CORE}):")
    report("chats completed through Gantry", len(gantry_runs), "chats", CROWD)
    report("wall time through Gantry, pages open (vs 100 direct streams)", gantry_time, "s", direct_time)
    for p, target in ((50, ""), (99, "<= 50 ms")):
        added = percentile(gantry_gaps, p) - percentile(direct_gaps, p)
        how = f"Gantry {percentile(gantry_gaps, p):.1f} ms, direct {percentile(direct_gaps, p):.1f} ms"
        report(f"inter-token latency p{p} added by Gantry", added, "ms", None, target, how)
    report(
        "Gantry's CPU per relayed token", spent * 1000 / max(tokens, 1), "ms", None, "",
        f"daphne's CPU time over the {CROWD} chats ({spent:.2f} s: sockets, posts, saves included) / {tokens} tokens relayed",
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        config = {"model": {"model_name": MODEL}, "developer": {"cpu_threads": MODEL_THREADS}}
        with run_tabby(Path(workdir) / "tabby", DEMO_MODELS, config=config) as tabby:
            wait_loaded(tabby, MODEL)
            env = {"GANTRY_MAX_ANSWER_TOKENS": str(FIRST_TOKEN_TOKENS)}
            with run_site(Path(workdir) / "site-first", tabby.url, extra_env=env) as site:
                asyncio.run(first_tokens(tabby, site))
            with run_site(Path(workdir) / "site", tabby.url, extra_env={"GANTRY_MAX_ANSWER_TOKENS": str(TOKENS)}) as site:
                asyncio.run(single_streams(tabby, site))
        with run_tabby(Path(workdir) / "tabby-shared", DEMO_MODELS, config={"model": {"model_name": MODEL}}) as tabby:
            wait_loaded(tabby, MODEL)
            env = {"GANTRY_MAX_ANSWER_TOKENS": str(FIRST_TOKEN_TOKENS)}
            with run_site(Path(workdir) / "site-shared", tabby.url, extra_env=env) as site:
                how = ", the model server on every core (for reference)"
                asyncio.run(first_tokens(tabby, site, SHARED_CORES_PAIRS, how))
        config = {"model": {"model_name": TINY}, "developer": {"cpu_threads": MODEL_THREADS}}
        with run_tabby(Path(workdir) / "tabby-tiny", DEMO_MODELS, config=config) as tabby:
            wait_loaded(tabby, TINY)
            # All 100 at once, as the direct baseline does (the default lets 8 run and queues the rest).
            crowd_env = {
                "GANTRY_MAX_ANSWER_TOKENS": str(CROWD_TOKENS),
                "GANTRY_MAX_CONCURRENT_GENERATIONS": str(CROWD),
                "GANTRY_MAX_SOCKETS_PER_USER": str(CROWD),  # one person's hundred pages: the relay is measured, not the cap
            }
            with run_site(Path(workdir) / "site-crowd", tabby.url, extra_env=crowd_env) as site, on_cores(tabby, site) as daphne:
                asyncio.run(crowd(tabby, site, daphne))


@contextmanager
def on_cores(tabby: TabbyServer, site: Site, bench_core: int = MODEL_CORE) -> Iterator[int]:
    """The model server on one core, daphne on the other, this bench on `bench_core` (beside the model
    server unless told); gives daphne's pid."""
    daphne = site.processes[0].pid
    every = os.sched_getaffinity(0)
    pin(tabby.process.pid, {MODEL_CORE})
    pin(daphne, {SITE_CORE})
    os.sched_setaffinity(0, {bench_core})
    try:
        yield daphne
    finally:
        os.sched_setaffinity(0, every)
        pin(daphne, every)
        pin(tabby.process.pid, every)


if __name__ == "__main__":
    main()
