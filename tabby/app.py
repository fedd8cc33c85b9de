"""The app factory: one FastAPI app per server process, its state, its start and its stop.

The routes (`tabby.routes`) read what they need from `app.state`: the config and the authenticator,
set here, and the model manager, made when the app starts (it lives as long as the event loop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from tabby.auth import Authenticator, AuthKeys
from tabby.config import Config
from tabby.errors import TabbyError
from tabby.heap import settle
from tabby.manager import LoadRequest, ModelManager
from tabby.routes import router

log = logging.getLogger("tabby")


def create_app(config: Config, keys: AuthKeys | None) -> FastAPI:
    app = FastAPI(title="TabbyAPI", summary="Gantry's TabbyAPI-compatible model server", lifespan=lifespan)
    app.state.config = config
    app.state.auth = Authenticator(None if config.network.disable_auth else keys)
    # Any page may call the API with a key in a header, but never with the browser's credentials:
    # TabbyAPI allows credentials too, and then reflects every Origin, so any site could ride on them.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=False, allow_methods=["*"], allow_headers=["*"])
    # Starlette types a handler as taking any Exception; this one is only ever called with a TabbyError.
    app.add_exception_handler(TabbyError, error_response)  # type: ignore[arg-type]
    app.include_router(router)
    return app


async def error_response(request: Request, exc: TabbyError) -> JSONResponse:
    """The body and status FastAPI gives an HTTPException, which is what TabbyAPI answers."""
    return JSONResponse(status_code=exc.status, content={"detail": exc.detail})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    config: Config = app.state.config
    manager = ModelManager(config)
    app.state.manager = manager
    settle()  # what the imports built lives as long as the server
    if config.model.model_name:
        app.state.startup_load = asyncio.create_task(startup_load(manager, config))
    yield
    await manager.shutdown()


async def startup_load(manager: ModelManager, config: Config) -> None:
    name = config.model.model_name
    try:
        last = await manager.load_and_wait(LoadRequest(name, config.model.load_options()))
    except TabbyError as exc:
        log.error("Could not load %s at startup: %s", name, exc.detail)
        return
    if "error" in last:
        log.error("Could not load %s at startup: %s", name, last["error"]["message"])
