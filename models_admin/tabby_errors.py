"""Failures talking to TabbyAPI, one family (`BackendError`), each with a sentence for people; and the
reading of TabbyAPI's error answers (FastAPI's `{"detail": ...}`, validation lists, plain text) into them.

A plain library (no Django), as the rest of the client.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

# TabbyAPI's answer to generation, `GET /v1/model` and unload while nothing is loaded (or a load runs).
NOTHING_LOADED = "No models are currently loaded."


class BackendError(Exception):
    """A failure talking to TabbyAPI.

    `message` says what happened in a sentence for people; `status` is the HTTP status of TabbyAPI's error
    answer, None when there was none (unreachable, or an error reported inside a 200 stream).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class BackendUnavailable(BackendError):
    """TabbyAPI cannot be reached, stopped answering, or the connection broke."""


class BackendAuthError(BackendError):
    """TabbyAPI refused the key (401/403), or the admin key has only an API key's rights.

    `key` says which of Gantry's keys: "admin" or "api".
    """

    def __init__(self, message: str, status: int | None = None, key: str = "admin") -> None:
        super().__init__(message, status)
        self.key = key


class NoModelLoaded(BackendError):
    """Nothing is loaded, which is also how TabbyAPI looks while a load runs."""


class ModelLoadFailed(BackendError):
    """A load stream reported an error, or closed before the model's final `finished` event."""


class BackendBadResponse(BackendError):
    """TabbyAPI refused the request or answered something Gantry cannot use."""


class GenerationFailed(BackendError):
    """A completion stream reported an error, or closed before the answer was complete."""


# Reading error answers


def fastapi_detail(response: httpx.Response) -> str | None:
    """FastAPI's `{"detail": ...}` as one sentence; None when the body is not that (e.g. a plain-text 500)."""
    try:
        data = json.loads(response.content)
    except ValueError:
        return None
    if not isinstance(data, dict) or "detail" not in data:
        return None
    detail = data["detail"]
    if isinstance(detail, list):  # a 422: one item per field that failed validation
        return "; ".join(validation_item(item) for item in detail) or None
    return str(detail).strip() or None


def validation_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    text = str(item.get("msg") or "Invalid value")
    field = field_name(item.get("loc"))
    ctx = item.get("ctx")
    reason = ctx.get("error") if isinstance(ctx, dict) else None
    return text + (f" for {field}" if field else "") + (f" ({reason})" if reason else "")


def field_name(loc: Any) -> str:
    """`["body", "messages", 0, "content"]` -> `messages[0].content`; `["body", 15]` -> a JSON position."""
    if not isinstance(loc, list) or len(loc) < 2:
        return ""
    rest = loc[1:]  # loc[0] says where in the request: body, query, header
    if len(rest) == 1 and isinstance(rest[0], int):
        return f"the {loc[0]} at character {rest[0]}"
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in rest).lstrip(".")


def short_text(response: httpx.Response) -> str:
    lines = response.content.decode("utf-8", errors="replace").strip().splitlines()
    return lines[0][:200] if lines else response.reason_phrase


def sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "?", "!")) else text + "."
