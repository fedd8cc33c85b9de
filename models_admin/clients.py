"""The TabbyAPI clients of each backend: its address and keys (the default's from the settings or
TabbyAPI's tokens file, an added backend's from its row), for admin calls and for answers."""

from __future__ import annotations

import asyncio
import functools
import weakref
from pathlib import Path

import yaml
from django.conf import settings

from models_admin.models import DEFAULT_BACKEND, Backend
from models_admin.tabby_client import TabbyClient, TabbyConfig


def tabby_config(quick: bool = False, backend: Backend | None = None) -> TabbyConfig:
    """A backend's address and keys (None: the default's). The default's come from the settings, else the
    server's own api_tokens.yml; an added backend's are its row's. `quick` waits at most
    TABBY_CHECK_TIMEOUT for an answer (checks, refreshes and what pages ask for)."""
    read_timeout = settings.TABBY_CHECK_TIMEOUT if quick else settings.TABBY_READ_TIMEOUT
    if backend is not None and not backend.is_default:
        fix = f"set the keys of the backend {backend.name} again in the Backends tab (or PATCH /api/admin/backends/{backend.name}/)"
        return TabbyConfig(
            base_url=backend.base_url,
            api_key=backend.api_key,
            admin_key=backend.admin_key,
            connect_timeout=min(settings.TABBY_CONNECT_TIMEOUT, read_timeout),
            read_timeout=read_timeout,
            admin_key_fix=fix,
            api_key_fix=fix,
        )
    api_key, admin_key = settings.TABBY_API_KEY, settings.TABBY_ADMIN_KEY
    file_api_key = file_admin_key = ""
    if (not api_key or not admin_key) and settings.TABBY_TOKENS_FILE:
        path = Path(settings.TABBY_TOKENS_FILE)
        file_api_key, file_admin_key = _tokens(path, path.stat().st_mtime_ns)
    return TabbyConfig(
        base_url=settings.TABBY_HOST,
        api_key=api_key or file_api_key,
        admin_key=admin_key or file_admin_key,
        connect_timeout=min(settings.TABBY_CONNECT_TIMEOUT, read_timeout),
        read_timeout=read_timeout,
        admin_key_fix=_key_fix("TABBY_ADMIN_KEY", "admin_key", from_file=not admin_key and bool(file_admin_key)),
        api_key_fix=_key_fix("TABBY_API_KEY", "api_key", from_file=not api_key and bool(file_api_key)),
    )


def _key_fix(setting: str, field: str, from_file: bool) -> str:
    """How to fix a key TabbyAPI refuses: the end of the error's sentence, naming the setting."""
    where = f"the api_tokens.yml of the TabbyAPI at {settings.TABBY_HOST}"
    if from_file:
        return f"Gantry read it from TABBY_TOKENS_FILE ({settings.TABBY_TOKENS_FILE}): point that setting at {where}, or set {setting} to its {field}"
    return f"set {setting} to the {field} in {where}"


@functools.lru_cache(maxsize=4)
def _tokens(path: Path, mtime_ns: int) -> tuple[str, str]:
    """(API key, admin key) from TabbyAPI's api_tokens.yml, read again only when the file changes."""
    tokens = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    api = tokens.get("api_key")
    return str(api[0] if isinstance(api, list) else api or ""), str(tokens.get("admin_key") or "")


_answer_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, TabbyClient]] = weakref.WeakKeyDictionary()


def answer_client(backend: Backend | None = None) -> TabbyClient:
    """The running loop's client for answers from a backend (None: the default), kept open: its
    connections to TabbyAPI are reused, so an answer's first token does not wait on a new connection.
    Callers don't close it."""
    loop = asyncio.get_running_loop()
    config = tabby_config(backend=backend)
    clients = _answer_clients.setdefault(loop, {})
    name = backend.name if backend is not None else DEFAULT_BACKEND
    client = clients.get(name)
    if client is None or client.config != config:
        # New keys or address: a new client. The old one is not closed, which would cut the answers
        # still streaming on it; its connections close with it once those are done.
        client = clients[name] = TabbyClient(config)
    return client


def admin_client(quick: bool = False, backend: Backend | None = None) -> TabbyClient:
    """A client for admin calls to a backend (None: the default; close it: use as `with`); `quick`: see
    tabby_config."""
    return TabbyClient(tabby_config(quick, backend))
