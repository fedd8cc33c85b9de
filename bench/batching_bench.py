"""Batched generation in the model server, over HTTP, with the server computing on one thread.

- eight concurrent streams: total tokens per second vs one stream alone (ratio, target >= 3x)
- a request joining a running batch of seven: time to its first token vs the same request alone
  (ratio of medians, target <= 2x)

Alone and batched runs are interleaved in the same run, so drifts in machine load hit both alike.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import median, report
from harness.tabby_server import DEMO_MODELS, TabbyServer, run_tabby, wait_loaded

MODEL = "Small-Chat-200M"
THREADS = 1  # the server's torch threads (`developer.cpu_threads`), as in the site's benches
STREAMS = 8
TOKENS = 128
ROUNDS = 3
JOINS = 5
MESSAGES = [{"role": "user", "content": "Describe what a Python package is, in a few sentences."}]


def body(tokens: int, seed: int) -> dict[str, Any]:
    return {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0.8, "seed": seed, "ban_eos_token": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def stream(client: httpx.AsyncClient, tokens: int, seed: int, progress: list[int] | None = None) -> tuple[float, int]:
    """(seconds to the first piece of text, completion tokens) of one streamed answer."""
    started = time.perf_counter()
    first = 0.0
    count = 0
    async with client.stream("POST", "/v1/chat/completions", json=body(tokens, seed)) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                if progress is not None:
                    progress[0] += 1
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
    return first - started, count


async def throughput(client: httpx.AsyncClient, streams: int) -> float:
    """Total completion tokens per second of `streams` answers started together."""
    started = time.perf_counter()
    results = await asyncio.gather(*(stream(client, TOKENS, seed) for seed in range(streams)))
    return sum(count for _, count in results) / (time.perf_counter() - started)


async def joining(client: httpx.AsyncClient) -> float:
    """Time to first token of a request sent while seven others are streaming."""
    progress = [0]
    running = [asyncio.create_task(stream(client, TOKENS, seed, progress)) for seed in range(STREAMS - 1)]
    while progress[0] < 8 * (STREAMS - 1):  # every one of them well under way
        await asyncio.sleep(0.01)
    first, _ = await stream(client, 8, 99)
    await asyncio.gather(*running)
    return first


async def measure(server: TabbyServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=600) as client:
        await throughput(client, 1)  # warm-up
        alone: list[float] = []
        batched: list[float] = []
        for _ in range(ROUNDS):
            alone.append(await throughput(client, 1))
            batched.append(await throughput(client, STREAMS))
        first_alone: list[float] = []
        first_joining: list[float] = []
        for _ in range(JOINS):
            first_alone.append((await stream(client, 8, 99))[0])
            first_joining.append(await joining(client))
    print(f"Batched generation, {MODEL}, {TOKENS} tokens per stream, server on {THREADS} CPU thread, median of {ROUNDS}:")
    report(f"{STREAMS} concurrent streams, total tokens/s (vs one stream alone)", median(batched), "tok/s", median(alone), ">= 3x")
    report("first token of a request joining a running batch (vs alone)", median(first_joining) * 1000, "ms",
           median(first_alone) * 1000, "<= 2x", how=f"median of {JOINS}; it joins {STREAMS - 1} streams under way")


def main() -> None:
    config = {"model": {"model_name": MODEL}, "developer": {"cpu_threads": THREADS}}
    with tempfile.TemporaryDirectory() as workdir, run_tabby(Path(workdir), DEMO_MODELS, config=config) as server:
        wait_loaded(server, MODEL)
        asyncio.run(measure(server))


if __name__ == "__main__":
    main()
