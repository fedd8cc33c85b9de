"""The loaded model's life: loads one at a time, generations counted, unload that drains.

Truth about "what is loaded" lives here, in one object per server process. Loads run as tasks of
their own, so a client that closes its progress stream does not stop the load (as in TabbyAPI).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabby.config import Config
from tabby.engines import create_engine
from tabby.engines.base import Engine, LoadOptions
from tabby.errors import ModelNameError, ModelNotLoadedError
from tabby.heap import settle

log = logging.getLogger("tabby")

LoadEvent = dict[str, Any]
# The longest file name most file systems allow; a longer one would make the lookup itself fail.
MAX_NAME_BYTES = 255


def progress_event(module: int, modules: int, status: str, model_type: str = "model") -> LoadEvent:
    return {"model_type": model_type, "module": module, "modules": modules, "status": status}


def error_event(message: str) -> LoadEvent:
    return {"error": {"message": message, "trace": None}}


@dataclass
class LoadRequest:
    model_name: str
    options: LoadOptions
    backend: str | None = None


class ModelManager:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.model_dir = config.model_path
        self.engine: Engine | None = None
        self.loading = False
        self.unloading = False
        self._load_lock = asyncio.Lock()
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()

    # Folders

    def folder_names(self) -> list[str]:
        """Every folder of the model directory, in filesystem order (as TabbyAPI lists them)."""
        try:
            with os.scandir(self.model_dir) as entries:
                return [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        except FileNotFoundError:
            return []

    def resolve(self, name: str) -> Path:
        """The folder of a model name, or the ModelNameError (HTTP 400) TabbyAPI gives before any stream."""
        if not name:
            raise ModelNameError("A model name was not provided for load.")
        if name in (".", "..") or "/" in name or "\\" in name or ".." in name or Path(name).is_absolute():
            raise ModelNameError("A model name must be the name of a folder in the model directory, not a path.")
        if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES or "\x00" in name:
            raise ModelNameError(f"A model name is the name of a folder: at most {MAX_NAME_BYTES} bytes, with no NUL character.")
        path = self.model_dir / name
        try:
            found = path.is_dir()
        except (OSError, ValueError):  # what the file system refuses to look up names no folder
            found = False
        if not found:
            raise ModelNameError("Could not find the model path for load. Check model name or config.yml?")
        return path

    # State

    @property
    def ready_engine(self) -> Engine | None:
        return None if self.loading or self.unloading else self.engine

    def require_engine(self) -> Engine:
        engine = self.ready_engine
        if engine is None:
            raise ModelNotLoadedError()
        return engine

    @asynccontextmanager
    async def generation(self) -> AsyncIterator[Engine]:
        """Hold the model for one generation; unload waits for these to end."""
        engine = self.require_engine()
        self._running += 1
        self._idle.clear()
        try:
            yield engine
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    # Loading

    def start_load(self, request: LoadRequest) -> asyncio.Queue[LoadEvent | None]:
        """Validate the name now (ModelNameError), then load in a task; events end with None."""
        path = self.resolve(request.model_name)
        events: asyncio.Queue[LoadEvent | None] = asyncio.Queue()
        task = asyncio.create_task(self._load(path, request, events))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return events

    async def _load(self, path: Path, request: LoadRequest, events: asyncio.Queue[LoadEvent | None]) -> None:
        async with self._load_lock:
            try:
                await self._load_locked(path, request, events.put_nowait)
            except Exception as exc:  # noqa: BLE001  any failure is the load's last event, not the server's
                log.warning("Loading %s failed: %s", path.name, exc)
                events.put_nowait(error_event(str(exc) or type(exc).__name__))
            finally:
                self.loading = False
                events.put_nowait(None)

    async def _load_locked(self, path: Path, request: LoadRequest, put: Any) -> None:
        if self.engine is not None and self.engine.model_dir == path:
            put(progress_event(1, 1, "processing"))
            put(progress_event(1, 1, "finished"))
            return
        backend = request.backend or self.config.model.backend
        # Building the engine validates the folder, so a broken one fails while the old model still serves.
        engine = await asyncio.to_thread(create_engine, backend, path, request.options)
        self.loading = True
        if self.engine is not None:
            await self._drain_and_unload()
        log.info("Loading %s", path.name)
        try:
            modules = await self._run_load(engine, put)
        except BaseException:
            await asyncio.to_thread(engine.unload)
            raise
        self.engine = engine
        settle()  # the model's objects live as long as it: the collector's passes no longer walk them
        put(progress_event(modules, modules, "finished"))
        log.info("Loaded %s (%d modules)", path.name, modules)

    async def _run_load(self, engine: Engine, put: Any) -> int:
        loop = asyncio.get_running_loop()
        modules = 0

        def work() -> None:
            nonlocal modules
            for k, n in engine.load_gen():
                modules = n
                loop.call_soon_threadsafe(put, progress_event(k, n, "processing"))

        await asyncio.to_thread(work)
        return modules

    async def load_and_wait(self, request: LoadRequest) -> LoadEvent:
        """Run a load to its end; return its last event (for startup and inline loading)."""
        events = self.start_load(request)
        last: LoadEvent = {}
        while (event := await events.get()) is not None:
            last = event
        return last

    # Unloading

    async def unload(self) -> None:
        if self.loading or self.engine is None:
            raise ModelNotLoadedError()
        async with self._load_lock:
            if self.engine is None:
                raise ModelNotLoadedError()
            await self._drain_and_unload()

    async def _drain_and_unload(self) -> None:
        """Let running generations finish (bounded), then unload; what still runs is cancelled."""
        engine = self.engine
        assert engine is not None
        self.unloading = True
        try:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=self.config.model.unload_timeout)
            except TimeoutError:
                log.warning("Cancelling %d generation(s) still running after %.0f s", self._running, self.config.model.unload_timeout)
            await asyncio.to_thread(engine.unload)
            self.engine = None
            log.info("Unloaded %s", engine.model_name)
        finally:
            self.unloading = False

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.unload)
            self.engine = None
