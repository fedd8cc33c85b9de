"""Reading OpenAI's request bodies (`POST /v1/chat/completions`, `POST /v1/completions`): every field
Gantry passes on is checked, and a request it cannot answer as asked is refused with a sentence naming
the field, in OpenAI's error shape, before anything is queued."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from gantry.parsers import is_storable, loads

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MOST_MESSAGES = 500
MOST_STOPS = 4
# Fields OpenAI has that Gantry cannot honour: refused rather than silently ignored.
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "suffix", "echo")


class ApiError(Exception):
    """A refusal in OpenAI's shape: `{"error": {"message", "type", "code", "param"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


@dataclass
class Asked:
    """A checked request: what the queue sends the model server (`request`, see chat.prompts.asked), the
    text its row shows (`content`), and how the answer is wanted."""

    kind: str  # "chat" or "completion"
    request: dict[str, Any]
    content: str
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


def json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = loads(raw or b"")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The body is not valid JSON. Send a JSON object, with Content-Type: application/json.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Send a JSON object as the body.")
    return body


def _number(body: dict[str, Any], name: str, low: float, high: float, whole: bool = False) -> None | int | float:
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not low <= value <= high:
        kind = "a whole number" if whole else "a number"
        upper = "" if high == math.inf else f" and {high:g}"
        raise invalid(name, f"`{name}` must be {kind} between {low:g}{upper}; it is {value!r}.")
    return value


def sampling(body: dict[str, Any]) -> dict[str, Any]:
    """The generation fields passed on to the model server, checked."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}, False, ""):
            raise invalid(name, f"`{name}` is not supported by this server; send the request without it.")
    if body.get("n") not in (None, 1):
        raise invalid("n", "`n` must be 1: this server gives one answer per request.")
    if body.get("logprobs") not in (None, False, 0):
        raise invalid("logprobs", "`logprobs` is not supported by this server; send the request without it.")
    params: dict[str, Any] = {}
    ranges = {
        "temperature": (0, 2),
        "top_p": (0, 1),
        "min_p": (0, 1),
        "repetition_penalty": (0.01, 10),
        "presence_penalty": (-2, 2),
        "frequency_penalty": (-2, 2),
    }
    for name, (low, high) in ranges.items():
        if (value := _number(body, name, low, high)) is not None:
            params[name] = value
    if (top_k := _number(body, "top_k", 0, math.inf, whole=True)) is not None:
        params["top_k"] = top_k
    if (seed := _number(body, "seed", -(2**63), 2**64 - 1, whole=True)) is not None:
        params["seed"] = seed
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if (count := _number({name: tokens}, name, 1, math.inf, whole=True)) is not None:
        params["max_tokens"] = count
    if (stop := _stops(body.get("stop"))) is not None:
        params["stop"] = stop
    return params


def _stops(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s and is_storable(s) for s in stops):
        raise invalid("stop", "`stop` must be a non-empty text, or a list of them.")
    if len(stops) > MOST_STOPS:
        raise invalid("stop", f"`stop` may list at most {MOST_STOPS} texts; it lists {len(stops)}.")
    return stops or None


def _text(value: Any, param: str) -> str:
    """A message's content: text, or a list of text parts; checked as chat checks what people type."""
    if isinstance(value, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            parts = '{"type": "text", "text": ...}'
            raise invalid(param, f"`{param}` may only hold text parts ({parts}): this server reads text only.")
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise invalid(param, f"`{param}` must be text.")
    if not is_storable(value):
        raise invalid(param, f"`{param}` has a character that cannot be stored (a NUL character or half of a surrogate pair).")
    limit = settings.GANTRY_MAX_MESSAGE_CHARS
    if len(value) > limit:
        raise invalid(param, f"`{param}` has {len(value):,} characters; the limit is {limit:,}.")
    return value


def _common(body: dict[str, Any]) -> tuple[bool, bool, str | None]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream", "`stream` must be true or false.")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise invalid("stream_options", '`stream_options` must be an object like {"include_usage": true}.')
    model = body.get("model")
    if model is not None and not (isinstance(model, str) and is_storable(model)):
        raise invalid("model", "`model` must be the name of a model, as text.")
    return stream, bool(options.get("include_usage", False)), model


def chat_request(body: dict[str, Any]) -> Asked:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", 'Send `messages`, a list like [{"role": "user", "content": "Hello"}].')
    if len(messages) > MOST_MESSAGES:
        raise invalid("messages", f"`messages` has {len(messages):,} messages; the limit is {MOST_MESSAGES}.")
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise invalid(f"messages[{i}].role", f"`messages[{i}].role` must be one of system, developer, user or assistant.")
        turns.append({"role": ROLES[role], "content": _text(message.get("content"), f"messages[{i}].content")})
    stream, usage, model = _common(body)
    params = sampling(body)
    content = next((t["content"] for t in reversed(turns) if t["role"] == "user" and t["content"].strip()), "")
    return Asked("chat", {"messages": turns, "params": params}, content or "(an API request)", stream, usage, model, params)


def completion_request(body: dict[str, Any]) -> Asked:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise invalid("prompt", "Send one prompt per request (`prompt` as text, or a list of one text).")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt", "Send `prompt`, the text to continue.")
    prompt = _text(prompt, "prompt")
    if body.get("best_of") not in (None, 1):
        raise invalid("best_of", "`best_of` must be 1: this server gives one answer per request.")
    stream, usage, model = _common(body)
    params = sampling(body)
    content = prompt if prompt.strip() else "(an API request)"
    return Asked("completion", {"prompt": prompt, "params": params}, content, stream, usage, model, params)
