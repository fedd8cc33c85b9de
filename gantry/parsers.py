"""Reading what clients send: a malformed body is the client's mistake (400), whatever its shape, and
text is kept only when it can be stored.

Python's json module raises RecursionError, not ValueError, for arrays or objects nested a few thousand
deep; every reader of client JSON (the chat API's parser, the admin API, the sockets) goes through here.
"""

from __future__ import annotations

import json
from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

TOO_DEEP = "JSON parse error - nested too deeply."


def is_storable(text: str) -> bool:
    """Whether text can be stored and sent back: no NUL (PostgreSQL's text refuses it) and no unpaired
    surrogate (JSON's \\ud800 escapes make them; no UTF-8 encoding has one)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def loads(raw: str | bytes) -> Any:
    """json.loads, raising ValueError for every malformed text (too deep included)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(TOO_DEEP) from None


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, with a body nested too deeply answered 400 like any malformed one."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(TOO_DEEP) from None
