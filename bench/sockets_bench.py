"""Many idle chat pages on one daphne process: what a thousand open sockets cost while nothing happens.

- added memory: daphne's resident memory with the thousand pages open minus before (target < 100 MB)
- CPU while idle: daphne's CPU time over IDLE_SECONDS with the pages open, as a share of one core
  (target < 2%), against the same window with one page open (the model watcher's one check a second);
  the window holds a socket heartbeat (GANTRY_SOCKET_HEARTBEAT, 30 s) and daphne's pings (20 s)
- a message on one more page: its first token through Gantry minus the model server's own, the
  median of pairs asked back to back (target <= 20 ms)

The model server and the bench's client run on one core and daphne alone on the other, as in the crowd
of site_bench. The idle pages are those of one person (GANTRY_MAX_SOCKETS_PER_USER is raised for it: the
sockets are measured, not the cap); the message is another person's, since a person's own thousand pages
would each be told of the message's conversation (the sidebar), a thousand frames before its first
token. Like a browser, the bench's client sends no pings of its own.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import websockets

from bench.common import cpu_seconds, median, report, resident_bytes
from bench.site_bench import TINY, direct, in_pairs, logged_in, on_cores, percentile, through_gantry
from harness.site import MEMBER, OUTSIDER, Site, run_site
from harness.tabby_server import DEMO_MODELS, TabbyServer, run_tabby, wait_loaded

PAGES = 1000
CONVERSATIONS = 100  # the pages are spread over them, ten a conversation
OPENING_AT_ONCE = 50
IDLE_SECONDS = 45.0
SETTLE_SECONDS = 5.0
TOKENS = 4
PAIRS = 20
PAUSE = 0.3


async def open_pages(site: Site, client: httpx.AsyncClient, cookie: str, stack: AsyncExitStack) -> None:
    conversations = [(await client.post(site.url + "/api/conversations/", json={})).json()["id"] for _ in range(CONVERSATIONS)]
    base = site.url.replace("http://", "ws://")
    headers = {"Cookie": cookie, "Origin": site.url}

    async def one(n: int) -> None:
        url = f"{base}/ws/chat/{conversations[n % CONVERSATIONS]}/"
        socket = await stack.enter_async_context(websockets.connect(url, additional_headers=headers, ping_interval=None))
        assert json.loads(await socket.recv())["type"] == "model.state"

    for start in range(0, PAGES, OPENING_AT_ONCE):
        await asyncio.gather(*(one(n) for n in range(start, min(start + OPENING_AT_ONCE, PAGES))))


async def idle_share(daphne: int) -> float:
    """Daphne's CPU time over IDLE_SECONDS of nothing happening, as a share of one core."""
    before, started = cpu_seconds(daphne), time.perf_counter()
    await asyncio.sleep(IDLE_SECONDS)
    return (cpu_seconds(daphne) - before) / (time.perf_counter() - started)


async def first_tokens(tabby: TabbyServer, site: Site, client: httpx.AsyncClient, cookie: str) -> list[float]:
    async def pause_then_direct() -> tuple[float, float, list[float]]:
        await asyncio.sleep(PAUSE)
        return await direct(tabby, client, TOKENS)

    async def pause_then_gantry() -> tuple[float, float, list[float]]:
        await asyncio.sleep(PAUSE)
        return await through_gantry(site, client, cookie)

    runs = await in_pairs(PAIRS, pause_then_gantry, pause_then_direct)
    return sorted((gantry[0] - plain[0]) * 1000 for gantry, plain in runs)


async def measure(tabby: TabbyServer, site: Site, daphne: int) -> None:
    client, cookie = await logged_in(site, MEMBER)
    other, other_cookie = await logged_in(site, OUTSIDER)
    async with AsyncExitStack() as pages:
        try:
            await direct(tabby, other, TOKENS)
            await through_gantry(site, other, other_cookie)  # warm-up: one page, one answer
            one_page = await idle_share(daphne)
            memory = resident_bytes(daphne)
            await open_pages(site, client, cookie, pages)
            await asyncio.sleep(SETTLE_SECONDS)
            memory = resident_bytes(daphne) - memory
            many_pages = await idle_share(daphne)
            added = await first_tokens(tabby, site, other, other_cookie)
        finally:
            await client.aclose()
            await other.aclose()
    print(f"{PAGES} idle chat pages (sockets) on one daphne process ({TINY}; daphne alone on a core):")
    report(f"memory added by {PAGES} open pages", memory / 2**20, "MB", None, "< 100 MB", f"{memory / PAGES / 1024:.1f} KB a page")
    report(f"CPU while idle, {PAGES} pages open (share of a core)", many_pages * 100, "%", one_page * 100, "< 2%")
    report(
        "time to first token added by Gantry, one more page", median(added), "ms", None, "<= 20 ms",
        f"median of {PAIRS} pairs with {PAGES} pages open; quartiles {percentile(added, 25):.1f} / {percentile(added, 75):.1f} ms",
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        config = {"model": {"model_name": TINY}, "developer": {"cpu_threads": 1}}
        with run_tabby(Path(workdir) / "tabby", DEMO_MODELS, config=config) as tabby:
            wait_loaded(tabby, TINY)
            env = {"GANTRY_MAX_ANSWER_TOKENS": str(TOKENS), "GANTRY_MAX_SOCKETS_PER_USER": str(PAGES + 10)}
            with run_site(Path(workdir) / "site", tabby.url, extra_env=env) as site, on_cores(tabby, site) as daphne:
                asyncio.run(measure(tabby, site, daphne))


if __name__ == "__main__":
    main()
