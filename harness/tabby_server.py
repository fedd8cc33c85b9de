"""Start the real `tabby` server as a process on loopback, for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODELS = ROOT / "models"
API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TabbyServer:
    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path

    def headers(self, admin: bool = False) -> dict[str, str]:
        return {"x-admin-key": ADMIN_KEY, "x-api-key": ADMIN_KEY} if admin else {"x-api-key": API_KEY}

    def client(self, admin: bool = False, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(admin), timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_tabby(
    workdir: Path,
    model_dir: Path = DEMO_MODELS,
    config: dict[str, Any] | None = None,
    keys: dict[str, Any] | None = None,
    args: list[str] | None = None,
    ready_timeout: float = 60,
    port: int | None = None,
) -> Iterator[TabbyServer]:
    """Run `python -m tabby serve` in `workdir` until the block ends; wait for /health first."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "api_tokens.yml").write_text(yaml.safe_dump(keys or {"api_key": API_KEY, "admin_key": ADMIN_KEY}))
    settings: dict[str, dict[str, Any]] = {"network": {"host": "127.0.0.1", "port": port or free_port()}, "model": {"model_dir": str(model_dir)}}
    for section, values in (config or {}).items():
        settings.setdefault(section, {}).update(values)
    (workdir / "config.yml").write_text(yaml.safe_dump(settings))
    log_path = workdir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABBY_")}
    env["PYTHONPATH"] = str(ROOT)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tabby", "serve", *(args or [])], cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{settings['network']['port']}"
    server = TabbyServer(url, process, workdir, log_path)
    try:
        wait_healthy(server, ready_timeout)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_healthy(server: TabbyServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"The tabby server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"The tabby server did not answer /health within {timeout:.0f} s:\n{server.log()}")


def wait_loaded(server: TabbyServer, name: str, timeout: float = 120) -> None:
    """Wait until GET /v1/model names `name` (for servers started with a model to load)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(server.url + "/v1/model", headers=server.headers(), timeout=5)
        if response.status_code == 200 and response.json()["id"] == name:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} was not loaded within {timeout:.0f} s:\n{server.log()}")


def load_events(server: TabbyServer, name: str, *, client: httpx.Client | None = None, **body: Any) -> list[dict[str, Any]]:
    """POST /v1/model/load and return the parsed data events (pings skipped), through `client` (an admin
    client kept open, so a timed load does not also time setting one up) or a new one."""
    import json

    events: list[dict[str, Any]] = []
    with nullcontext(client) if client is not None else server.client(admin=True, timeout=300) as http:
        with http.stream("POST", "/v1/model/load", json={"model_name": name, **body}) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: ") :]))
    return events
