"""The model server against its own engine called in-process, on the demo models.

- streamed tokens per second over HTTP vs the engine in-process (ratio, target >= 0.90)
- time to first token over HTTP minus in-process (median, target <= 5 ms)
- load time of the 1 GB model vs reading its weight files from the page cache (median of 5, target <= 1.5x)
- batched generation (`bench.batching_bench`): eight concurrent streams vs one alone (target >= 3x), the
  first token of a request joining a running batch vs alone (target <= 2x)
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench import batching_bench
from bench.common import median, report
from harness.tabby_server import DEMO_MODELS, TabbyServer, load_events, run_tabby
from tabby.engines.base import LoadOptions, SamplingParams
from tabby.engines.torch_engine import TorchEngine

MODEL = "Small-Chat-200M"
LARGE = "Large-Chat-1G"
TOKENS = 128
ROUNDS = 7
LOADS = 5
MESSAGES = [{"role": "user", "content": "Describe what a Python package is, in a few sentences."}]


def params() -> SamplingParams:
    return SamplingParams(max_tokens=TOKENS, temperature=0.8, seed=7, ban_eos_token=True)


async def in_process(engine: TorchEngine) -> tuple[float, float]:
    """(time to first token, tokens per second) for one streamed answer from the engine itself."""
    started = time.perf_counter()
    prompt = engine.encode(engine.render_chat(MESSAGES))
    first = 0.0
    count = 0
    async for chunk in engine.generate(prompt, params()):
        if chunk.text and not first:
            first = time.perf_counter()
        count = chunk.token_count
    return first - started, count / (time.perf_counter() - started)


def over_http(server: TabbyServer, client: httpx.Client) -> tuple[float, float]:
    body = {"messages": MESSAGES, "max_tokens": TOKENS, "temperature": 0.8, "seed": 7, "ban_eos_token": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = 0.0
    count = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if not first and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
    return first - started, count / (time.perf_counter() - started)


def load_engine(name: str) -> TorchEngine:
    engine = TorchEngine(DEMO_MODELS / name, LoadOptions())
    for _ in engine.load_gen():
        pass
    return engine


def streaming(server: TabbyServer) -> None:
    engine = load_engine(MODEL)
    http_runs: list[tuple[float, float]] = []
    local_runs: list[tuple[float, float]] = []
    with server.client(timeout=300) as client:
        over_http(server, client)  # warm-up, both sides
        asyncio.run(in_process(engine))
        for _ in range(ROUNDS):  # interleaved, so drifts in machine load hit both alike
            http_runs.append(over_http(server, client))
            local_runs.append(asyncio.run(in_process(engine)))
    engine.unload()
    ttft_http, ttft_local = median([r[0] for r in http_runs]) * 1000, median([r[0] for r in local_runs]) * 1000
    tps_http, tps_local = median([r[1] for r in http_runs]), median([r[1] for r in local_runs])
    print(f"Streaming, {MODEL}, {TOKENS} tokens, median of {ROUNDS} interleaved runs:")
    report("tokens/s over HTTP (vs engine in-process)", tps_http, "tok/s", tps_local, ">= 0.90")
    report("time to first token over HTTP", ttft_http, "ms", ttft_local)
    report("time to first token added by HTTP (median)", ttft_http - ttft_local, "ms", None, "<= 5 ms")


def read_from_page_cache(files: list[Path]) -> float:
    """The floor for any load: the bytes copied out of the page cache into one reused buffer."""
    buffer = memoryview(bytearray(16 << 20))
    started = time.perf_counter()
    for file in files:
        with file.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def loading(server: TabbyServer) -> None:
    files = sorted((DEMO_MODELS / LARGE).glob("*.safetensors"))
    read_from_page_cache(files)  # bring the files into the page cache
    loads: list[float] = []
    reads: list[float] = []
    with server.client(admin=True, timeout=300) as client:
        for _ in range(LOADS):
            client.post("/v1/model/unload")
            started = time.perf_counter()
            events = load_events(server, LARGE, client=client)
            loads.append(time.perf_counter() - started)
            assert events[-1]["status"] == "finished", events[-1]
            reads.append(read_from_page_cache(files))
    size = sum(f.stat().st_size for f in files) / 1e6
    print(f"Loading {LARGE} ({size:.0f} MB), median of {LOADS}:")
    report("load time over HTTP (vs reading the files from page cache)", median(loads), "s", median(reads), "<= 1.5x")


def main() -> None:
    with tempfile.TemporaryDirectory() as workdir, run_tabby(Path(workdir), DEMO_MODELS) as server:
        assert load_events(server, MODEL)[-1]["status"] == "finished"
        streaming(server)
        loading(server)
    batching_bench.main()  # its own server, on one CPU thread


if __name__ == "__main__":
    main()
