"""Gantry's model server against the exchanges recorded from the real TabbyAPI server.

Every recorded `NN-*.json` (described in `shared/contracts/tabbyapi-recorded/README.md`) is replayed, with
the recorded method, path, headers and body bytes, against `python -m tabby serve` started with the
recording's own configuration (A, B, C or D). The answer must have the recorded status, content type,
body shape (every field and its JSON type, recursively) and body values. Left out are only the values the
recordings say change from run to run: `created` times, the order of model lists, ping timestamps and the
model directory inside the Broken-Model message. Streams must be framed as recorded (CRLF lines, each
`data:` line or ping comment followed by an empty line), with the recorded SSE and CORS headers.

Where Gantry's server answers otherwise on purpose, DELIBERATE_DIFFERENCES names the exchange, says why,
and states the answer Gantry gives instead, which is what gets checked.

Configuration C holds a load open: `Slow-Model/config.json` is a named pipe that gets its content only
~2.5 s after the load request (as in the recording, where it was ~3.5 s), and pings come every second.
Its exchanges (80-86) are replayed with their recorded timing by the explicit tests at the end.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.tabby_server import TabbyServer, run_tabby

# Where the recordings are: `shared/` sits beside the repository checkout.
CONTRACTS_ENV = "GANTRY_CONTRACTS_DIR"
CONTRACTS_DIR = Path(os.environ.get(CONTRACTS_ENV) or Path(__file__).resolve().parents[2].parent / "shared" / "contracts")
RECORDINGS_DIR = CONTRACTS_DIR / "tabbyapi-recorded"
MISSING = (
    f"No recorded TabbyAPI exchanges (NN-*.json) found in {RECORDINGS_DIR}. They belong in "
    f"shared/contracts/tabbyapi-recorded beside the repository checkout; set {CONTRACTS_ENV} to the "
    "'contracts' folder if they are elsewhere."
)

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"
PING = re.compile(r": ping - (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\+00:00)")
# Compared with the recording, present or absent alike (content-type is compared on its own).
COMPARED_HEADERS = (
    "allow",
    "cache-control",
    "x-accel-buffering",
    "connection",
    "transfer-encoding",
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
)

# A minimal llama-type config.json for the recorded model folders (they hold nothing else).
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 1,
    "vocab_size": 256,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# Recorded settings that are not passed on, and why.
LEFT_OUT_SETTINGS = {
    ("network", "host"): "the test server listens on loopback...",
    ("network", "port"): "...at a free port",
    ("developer", "unsafe_launch"): "TabbyAPI's switch to start without its GPU libraries; Gantry's server has no such check",
}
# How long the slow model's config.json (a named pipe) keeps its reader waiting.
PIPE_DELAY = 2.5


def read_recordings(folder: Path) -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("[0-9][0-9]-*.json"))}


RECORDINGS = read_recordings(RECORDINGS_DIR)


def recordings() -> dict[str, dict[str, Any]]:
    if not RECORDINGS:
        pytest.fail(MISSING, pytrace=False)
    return RECORDINGS


def recording(name: str) -> dict[str, Any]:
    return recordings()[name]


# Expected answers


class Text:
    """Any string starting with `prefix`: a message Gantry's server words itself."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Text):
            return other.prefix == self.prefix
        return isinstance(other, str) and other.startswith(self.prefix)

    def __repr__(self) -> str:
        return f"Text({self.prefix!r}...)"


AS_RECORDED: Any = "<as recorded>"


@dataclass(frozen=True)
class Difference:
    reason: str
    status: int | None = None  # None: as recorded
    content_type: str | None = None
    body: Any = AS_RECORDED  # JSON body, list of SSE data payloads, or text
    headers: dict[str, str | None] = field(default_factory=dict)  # compared headers answered otherwise (None: absent)


NOT_LOADED = {"detail": "No models are currently loaded."}
NOT_FOUND = {"detail": "Not Found"}
OWN_LOAD_ERROR = [{"error": {"message": Text(), "trace": None}}]
NO_PLAIN_500 = "no plain-text 500s: a `model` field while nothing is loaded answers the usual 503 JSON"
NO_WEIGHTS = (
    "the folder holds only a config.json: TabbyAPI failed on its missing exllamav3, Gantry's server fails on "
    "the folder (no weights) with its own message; same stream otherwise (one error event, no [DONE])"
)
NO_TEMPLATES = "/v1/templates is not served: Gantry's server has no folder of prompt templates (404 JSON)"
NO_CORS_CREDENTIALS = (
    "CORS never lets a page send the browser's credentials: TabbyAPI allows credentials with every origin, so it "
    "reflects any Origin with `allow-credentials: true`; Gantry's server allows every origin as `*`, without credentials"
)
ANY_ORIGIN = {"access-control-allow-origin": "*", "access-control-allow-credentials": None}

DELIBERATE_DIFFERENCES: dict[str, Difference] = {
    "23-models-wrong-x-admin-plus-valid-api": Difference(
        "no plain-text 500s: the invalid x-admin-key answers 400 JSON, as /v1/auth/permission does (11)",
        400,
        JSON,
        {"detail": "The provided authentication key is invalid."},
    ),
    "32-model-load-llama-sse-error-deps": Difference(NO_WEIGHTS, body=OWN_LOAD_ERROR),
    "33-model-load-qwen-bearer-admin-with-params": Difference(NO_WEIGHTS, body=OWN_LOAD_ERROR),
    "34-model-load-backend-exllamav2": Difference(
        "exllamav2 is still one of Gantry's backends (TabbyAPI dropped it); without a GPU, exllamav2 or weights "
        "the load fails with Gantry's own message",
        body=OWN_LOAD_ERROR,
    ),
    "47-chat-nothing-loaded-with-model-field": Difference(NO_PLAIN_500, 503, JSON, NOT_LOADED),
    "48-chat-stream-nothing-loaded-with-model-field": Difference(NO_PLAIN_500, 503, JSON, NOT_LOADED),
    "53-completions-nothing-loaded-with-model-field": Difference(NO_PLAIN_500, 503, JSON, NOT_LOADED),
    "57-templates-admin": Difference(NO_TEMPLATES, 404, JSON, NOT_FOUND),
    "58-templates-api-key": Difference(NO_TEMPLATES, 404, JSON, NOT_FOUND),
    "61-cors-preflight": Difference(NO_CORS_CREDENTIALS, headers=ANY_ORIGIN),
    "62-models-api-key-with-origin": Difference(NO_CORS_CREDENTIALS, headers=ANY_ORIGIN),
    "75-noauth-model-load-no-key": Difference(NO_WEIGHTS, body=OWN_LOAD_ERROR),
    "80-model-load-slow-with-pings": Difference(NO_WEIGHTS, body=OWN_LOAD_ERROR),
    "81-concurrent-load-first-held": Difference(NO_WEIGHTS, body=OWN_LOAD_ERROR),
    "82-concurrent-load-second-waits": Difference(NO_WEIGHTS, body=OWN_LOAD_ERROR),
    "93-inline-chat-admin-real-model": Difference(
        "no plain-text 500s: the failed inline load answers 503 JSON naming the model and the reason",
        503,
        JSON,
        {"detail": Text("Loading Qwen2.5-Coder-7B-Instruct failed: ")},
    ),
    "94-inline-chat-api-key-dummy-model": Difference(
        "no plain-text 500s: a dummy model name loads nothing, so the usual 503 JSON", 503, JSON, NOT_LOADED
    ),
    "95-inline-chat-admin-unknown-model": Difference(
        "no plain-text 500s: a model name without a folder loads nothing, so the usual 503 JSON", 503, JSON, NOT_LOADED
    ),
}

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def shape(value: Any) -> Any:
    """Every field and its JSON type, recursively."""
    if isinstance(value, Text):
        return "string"
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return JSON_TYPES[type(value)]


def without_run_values(value: Any) -> Any:
    """`value` without what changes from run to run: `created`, list order of cards, the model directory."""
    if isinstance(value, dict):
        return {key: "<created>" if key == "created" else without_run_values(item) for key, item in value.items()}
    if isinstance(value, list):
        items = [without_run_values(item) for item in value]
        if items and all(isinstance(item, dict) and "id" in item for item in items):
            items.sort(key=lambda card: str(card["id"]))
        return items
    if isinstance(value, str):
        return re.sub(r"^(Failed to load config\.json from ).*?([^/]+)$", r"\1<model_dir>/\2", value)
    return value


# Replaying


@dataclass
class Exchange:
    """One answer, with arrival times in seconds since the scenario started."""

    status: int
    headers: httpx.Headers
    sent_at: float
    opened_at: float
    ended_at: float
    chunks: list[tuple[float, bytes]]

    @property
    def raw(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def timed_lines(self) -> list[tuple[float, str]]:
        """Each CRLF-terminated line with the time its end arrived."""
        lines: list[tuple[float, str]] = []
        pending = b""
        for at, chunk in self.chunks:
            pending += chunk
            *complete, pending = pending.split(b"\r\n")
            lines += [(at, line.decode()) for line in complete]
        assert pending == b"", f"the stream ends in a line without CRLF: {pending!r}"
        return lines


def request_body(request: dict[str, Any]) -> bytes | None:
    if request.get("body_raw") is not None:
        body = request["body_raw"].encode()
    elif request["body"] is not None:
        body = json.dumps(request["body"]).encode()
    else:
        return None
    length = {name.lower(): value for name, value in request["headers"].items()}.get("content-length")
    assert length is None or len(body) == int(length), "the replayed body is not the recorded one"
    return body


@asynccontextmanager
async def bare_client(server: TabbyServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client that sends only the recorded headers (plus Host and Content-Length)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for name in list(client.headers):
            del client.headers[name]
        yield client


async def replay(client: httpx.AsyncClient, request: dict[str, Any], start: float, at: float = 0.0) -> Exchange:
    """Send the recorded request `at` seconds after `start` and read the whole answer."""
    await asyncio.sleep(max(0.0, start + at - time.monotonic()))
    headers = [(name, value) for name, value in request["headers"].items() if name.lower() not in ("host", "content-length")]
    sent_at = time.monotonic() - start
    async with client.stream(request["method"], request["path"], headers=headers, content=request_body(request)) as response:
        opened_at = time.monotonic() - start
        chunks = [(time.monotonic() - start, chunk) async for chunk in response.aiter_raw()]
    return Exchange(response.status_code, response.headers, sent_at, opened_at, time.monotonic() - start, chunks)


# Checking


def sse_lines(exchange: Exchange) -> list[str]:
    """The stream's lines, after checking its framing: CRLF lines, each data line or ping then an empty line."""
    raw = exchange.raw
    assert raw.endswith(b"\r\n\r\n"), f"an SSE body ends with an empty CRLF line: {raw!r}"
    lines = raw.decode().split("\r\n")[:-1]
    assert not any("\r" in line or "\n" in line for line in lines), f"every SSE line ends in CRLF: {raw!r}"
    assert lines[1::2] == [""] * (len(lines) // 2) and len(lines) % 2 == 0, f"each line is followed by an empty one: {lines}"
    for line in lines[::2]:
        assert line.startswith("data: ") or PING.fullmatch(line), f"only data lines and ping comments: {line!r}"
    return lines


def sse_data(lines: list[str]) -> list[Any]:
    payloads = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


def line_kinds(lines: list[str]) -> list[str]:
    """Per line "data" or "", leaving out ping comments and the empty line after each."""
    kinds: list[str] = []
    after_ping = False
    for line in lines:
        if not (PING.fullmatch(line) or after_ping and line == ""):
            kinds.append("data" if line else "")
        after_ping = bool(PING.fullmatch(line))
    return kinds


def check_answer(name: str, got: Exchange) -> None:
    """Status, content type, headers, body shape and values: as recorded, or as DELIBERATE_DIFFERENCES says."""
    recorded = recording(name)["response"]
    difference = DELIBERATE_DIFFERENCES.get(name, Difference("as recorded"))
    status = difference.status or recorded["status"]
    content_type = difference.content_type or recorded["headers"]["content-type"]
    assert (got.status, got.headers.get("content-type")) == (status, content_type), got.raw
    for header in COMPARED_HEADERS:
        expected_header = difference.headers[header] if header in difference.headers else recorded["headers"].get(header)
        assert got.headers.get(header) == expected_header, f"header {header}"

    body: Any
    expected: Any
    if content_type == SSE:
        lines = sse_lines(got)
        body = sse_data(lines)
        expected = recorded["sse_data_json"]
        # Pings depend on timing; the tests of configuration C count them.
        assert line_kinds(lines) == line_kinds(recorded["sse_lines"])
    elif content_type == JSON:
        body = json.loads(got.raw)
        expected = recorded.get("body_json")
    else:
        body = got.raw.decode()
        expected = recorded["body_raw"]
    if difference.body is not AS_RECORDED:
        expected = difference.body
    assert shape(body) == shape(expected)
    assert without_run_values(body) == without_run_values(expected)


# Servers


def server_config(config_id: str) -> dict[str, Any]:
    """The configuration the recordings of `config_id` were made with (they all agree)."""
    configs = [r["server_config"] for r in recordings().values() if r["server_config"]["id"] == config_id]
    assert configs and all(config == configs[0] for config in configs), f"configuration {config_id}"
    return configs[0]


def gantry_settings(config_yml: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for section, values in config_yml.items():
        kept = {key: value for key, value in values.items() if (section, key) not in LEFT_OUT_SETTINGS}
        if kept:
            settings[section] = kept
    return settings


def make_model_dir(model_dir: Path, contents: list[str]) -> None:
    """The recorded folders: "Name (config.json)", "Name (empty)" or "Name (config.json is a named pipe...)"."""
    for entry in contents:
        name, _, what = entry.partition(" (")
        folder = model_dir / name
        folder.mkdir(parents=True)
        if what.startswith("config.json is a named pipe"):
            os.mkfifo(folder / "config.json")
        elif what.startswith("config.json"):
            (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG), encoding="utf-8")
        elif not what.startswith("empty"):
            raise ValueError(f"Unknown model folder in the recording: {entry}")


class Servers:
    """One server process per recorded configuration, started when first needed."""

    def __init__(self, root: Path, stack: ExitStack) -> None:
        self.root = root
        self.stack = stack
        self.running: dict[str, TabbyServer] = {}

    def __getitem__(self, config_id: str) -> TabbyServer:
        if config_id not in self.running:
            config = server_config(config_id)
            settings = gantry_settings(config["config_yml"])
            workdir = self.root / config_id
            model_dir = workdir / settings["model"]["model_dir"]  # relative to the server's directory, as recorded
            make_model_dir(model_dir, config["model_dir_contents"])
            server = run_tabby(workdir, model_dir=model_dir, config=settings, keys=config["api_tokens_yml"])
            self.running[config_id] = self.stack.enter_context(server)
        return self.running[config_id]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with ExitStack() as stack:
        yield Servers(tmp_path_factory.mktemp("contract"), stack)


# The table: every exchange of configurations A, B and D

TABLE = [name for name, r in RECORDINGS.items() if r["server_config"]["id"] != "C"]
# Configuration C's exchanges, replayed with their recorded timing by the tests at the end.
SLOW_LOAD = "80-model-load-slow-with-pings"
CONCURRENT = [
    "81-concurrent-load-first-held",
    "82-concurrent-load-second-waits",
    "83-during-load-get-model",
    "84-during-load-models-api-key",
    "85-during-load-chat-stream",
    "86-during-load-unload",
]


@pytest.mark.parametrize("name", TABLE or ["recordings-not-found"])
async def test_gantry_answers_each_recorded_exchange_like_tabbyapi(name: str, servers: Servers) -> None:
    server = servers[recording(name)["server_config"]["id"]]
    async with bare_client(server) as client:
        got = await replay(client, recording(name)["request"], time.monotonic())
    check_answer(name, got)


def test_every_recording_is_replayed_and_every_difference_names_one() -> None:
    names = set(recordings())
    assert {*TABLE, SLOW_LOAD, *CONCURRENT} == names
    assert set(DELIBERATE_DIFFERENCES) <= names
    assert all(difference.reason for difference in DELIBERATE_DIFFERENCES.values())


# Configuration C: a load held open by a named pipe, pings every second


class DelayedPipeWrite(threading.Thread):
    """Writes LLAMA_CONFIG into the named pipe `path` once `delay` s have passed since `start`."""

    def __init__(self, path: Path, start: float, delay: float = PIPE_DELAY) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.begin = start
        self.delay = delay
        self.written_at: float | None = None  # seconds since start
        self.failure: str | None = None
        self.start()

    def run(self) -> None:
        time.sleep(max(0.0, self.begin + self.delay - time.monotonic()))
        deadline = time.monotonic() + 30
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # fails until the server opens it to read
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    self.failure = f"the server never opened {self.path} for reading: {exc}"
                    return
                time.sleep(0.01)
        os.set_blocking(fd, True)
        self.written_at = time.monotonic() - self.begin
        with os.fdopen(fd, "w", encoding="utf-8") as pipe:
            pipe.write(json.dumps(LLAMA_CONFIG))

    def released_at(self) -> float:
        self.join(timeout=35)
        assert self.failure is None, self.failure
        assert self.written_at is not None
        return self.written_at


def slow_pipe(server: TabbyServer) -> Path:
    settings = gantry_settings(server_config("C")["config_yml"])
    return server.workdir / settings["model"]["model_dir"] / "Slow-Model" / "config.json"


def check_pings_then_one_event(got: Exchange, first_event_not_before: float, min_pings: int) -> None:
    """Pings about every second from the stream's start, then the one data event, then the end."""
    lines = [(at, line) for at, line in got.timed_lines() if line]
    pings = [(at, PING.fullmatch(line)) for at, line in lines[:-1]]
    assert all(match for _, match in pings), f"only pings before the last event: {lines}"
    at_event, event = lines[-1]
    assert event.startswith("data: "), lines
    assert at_event >= first_event_not_before - 0.05, "the event came before the load could have ended"
    arrivals = [got.opened_at] + [at for at, _ in pings]
    assert len(pings) >= min_pings, f"at least {min_pings} ping(s) before the event: {lines}"
    assert all(0.5 < b - a < 1.6 for a, b in itertools.pairwise(arrivals)), f"pings every ~1 s from the start: {arrivals}"
    stamps = [datetime.fromisoformat(match.group(1)).timestamp() for _, match in pings if match]
    assert all(0.5 < b - a < 1.6 for a, b in itertools.pairwise(stamps)), f"ping timestamps ~1 s apart: {stamps}"
    assert got.ended_at - at_event < 0.5, "the stream ends after its event"


async def test_a_slow_load_sends_a_ping_every_second_then_its_error_event(servers: Servers) -> None:
    name = SLOW_LOAD
    server = servers["C"]
    async with bare_client(server) as client:
        start = time.monotonic()
        writer = DelayedPipeWrite(slow_pipe(server), start)
        got = await replay(client, recording(name)["request"], start)
    released = writer.released_at()
    check_answer(name, got)
    assert got.opened_at - got.sent_at < 0.5, "the stream opens at once"
    check_pings_then_one_event(got, released, min_pings=2)


async def test_a_second_load_waits_with_pings_and_a_load_in_progress_looks_like_nothing_loaded(servers: Servers) -> None:
    server = servers["C"]
    names = CONCURRENT
    async with bare_client(server) as client:
        start = time.monotonic()
        writer = DelayedPipeWrite(slow_pipe(server), start)
        sends = [
            replay(client, recording(name)["request"], start, recording(name)["transport"]["request_sent_at_offset_seconds"])
            for name in names
        ]
        got = dict(zip(names, await asyncio.gather(*sends)))
    released = writer.released_at()
    for name, exchange in got.items():
        check_answer(name, exchange)
    for name in names[2:]:
        assert got[name].ended_at < released, f"{name} was answered only after the slow load's config.json was written"

    first, second = got["81-concurrent-load-first-held"], got["82-concurrent-load-second-waits"]
    check_pings_then_one_event(first, released, min_pings=2)
    first_event_at = first.timed_lines()[-2][0]
    assert second.opened_at - second.sent_at < 0.5, "the second load's stream opens at once"
    # Only pings while the first load holds the lock (sent at 0.5 s, it waits ~2 s).
    check_pings_then_one_event(second, first_event_at, min_pings=1)
