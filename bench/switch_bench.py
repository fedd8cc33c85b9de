"""Model switching through Gantry against the model server's own unload + load, in one run.

- orchestration overhead: Gantry's switch wall time minus the model server's own unload + load (+ the
  verifying GET /v1/model) measured directly (median, target <= 150 ms)
- while one (slow) switch runs, 200 other requests (pages, API, 20 refused concurrent switches)
  answered with p99 under 200 ms
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import median, report
from harness.site import ADMIN, Site, run_site
from harness.tabby_server import DEMO_MODELS, TabbyServer, run_tabby, wait_loaded

A, B = "Tiny-Chat-5M", "Small-Chat-200M"
ROUNDS = 7


def direct_switch(client: httpx.Client, model: str) -> float:
    """Unload, load (reading the whole progress stream) and verify, with a client made beforehand (as
    Gantry's is: building one costs tens of milliseconds, which would flatter Gantry)."""
    started = time.perf_counter()
    client.post("/v1/model/unload")
    with client.stream("POST", "/v1/model/load", json={"model_name": model}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["status"] == "finished", events[-1]
    assert client.get("/v1/model").json()["id"] == model
    return time.perf_counter() - started


def gantry_switch(client: httpx.Client, model: str) -> float:
    started = time.perf_counter()
    response = client.post("/api/admin/models/switch", json={"model_id": model})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def overhead(tabby: TabbyServer, site: Site) -> None:
    gantry, direct = [], []
    with site.session(ADMIN) as client, tabby.client(admin=True, timeout=300) as tabby_client:
        client.post("/api/admin/models/refresh")
        gantry_switch(client, B)
        gantry_switch(client, A)  # warm-up
        for _ in range(ROUNDS):
            gantry.append(gantry_switch(client, B))
            direct.append(direct_switch(tabby_client, A))
            client.post("/api/admin/models/refresh")  # Gantry learns of the direct switch
            direct.append(direct_switch(tabby_client, B))
            client.post("/api/admin/models/refresh")
            gantry.append(gantry_switch(client, A))
    g, d = median(gantry) * 1000, median(direct) * 1000
    print(f"Switching {A} <-> {B}, median of {2 * ROUNDS}:")
    report("switch through Gantry's API (vs unload + load directly)", g, "ms", d)
    report("orchestration overhead (median)", g - d, "ms", None, "<= 150 ms")


async def timed(client: httpx.AsyncClient, method: str, url: str, **kwargs: object) -> tuple[float, int]:
    started = time.perf_counter()
    response = await client.request(method, url, **kwargs)  # type: ignore[arg-type]
    return time.perf_counter() - started, response.status_code


async def during_switch(site: Site, cookies: httpx.Cookies, target: str) -> None:
    async with httpx.AsyncClient(base_url=site.url, cookies=cookies, timeout=120) as client:
        switch = asyncio.create_task(client.post("/api/admin/models/switch", json={"model_id": target}))
        await asyncio.sleep(0.3)  # let the switch start: the requests below run while it is under way
        urls = ["/", "/admin/models/", "/admin/activity/", "/api/admin/models", "/api/conversations/"]
        calls: list[tuple[str, str, dict[str, object]]] = [("GET", urls[i % len(urls)], {}) for i in range(180)]
        calls += [("POST", "/api/admin/models/switch", {"json": {"model_id": A}}) for _ in range(20)]
        gate = asyncio.Semaphore(20)

        async def one(call: tuple[str, str, dict[str, object]]) -> tuple[float, int]:
            async with gate:
                return await timed(client, call[0], call[1], **call[2])

        results = await asyncio.gather(*(one(c) for c in calls))
        still_running = not switch.done()
        answer = await switch
    assert answer.status_code == 200, answer.text
    latencies = sorted(r[0] * 1000 for r in results)
    refused = sum(1 for r in results[180:] if r[1] == 409)
    ok = sum(1 for r in results[:180] if r[1] == 200)
    print(f"200 requests while a switch to {target} runs (it was still running when they ended: {still_running}):")
    report("requests answered 200 (pages and API)", ok, "reqs", 180)
    report("concurrent switch calls refused with 409", refused, "reqs", 20)
    report("latency p50", latencies[len(latencies) // 2], "ms")
    report("latency p99", latencies[int(len(latencies) * 0.99) - 1], "ms", None, "< 200 ms")


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        with run_tabby(Path(workdir) / "tabby", DEMO_MODELS, config={"model": {"model_name": A}}) as tabby:
            wait_loaded(tabby, A)
            with run_site(Path(workdir) / "site", tabby.url) as site:
                overhead(tabby, site)
        # A slow disk (100 MB/s) keeps the switch to the 1 GB model going for about ten seconds.
        slow = {"model": {"model_name": A, "load_throttle_mbps": 100}}
        with run_tabby(Path(workdir) / "tabby-slow", DEMO_MODELS, config=slow) as tabby:
            wait_loaded(tabby, A)
            with run_site(Path(workdir) / "site-slow", tabby.url) as site:
                with site.session(ADMIN) as client:
                    client.post("/api/admin/models/refresh")
                    cookies = client.cookies
                asyncio.run(during_switch(site, cookies, "Large-Chat-1G"))


if __name__ == "__main__":
    main()
