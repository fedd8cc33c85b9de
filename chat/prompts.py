"""What an answer's request sends TabbyAPI: a chat conversation's history, or a request of the
OpenAI-compatible API as its caller wrote it; each with the answering model's settings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import Subquery

from chat.models import Message
from chat.streaming import Prompt
from models_admin.models import Backend, ModelSettings
from models_admin.settings_fields import Values, chat_defaults


def history(conversation_id: int, content: str, before: datetime | None = None, model: str | None = None) -> Prompt:
    """What to send TabbyAPI for the question `content` asked at `before` (None: a question not saved yet,
    after everything): the conversation's answered turns before it, oldest first, then the question; with
    the settings of `model` (None: the model the backend holds), its system prompt first."""
    turns: list[dict[str, str]] = []
    for question, answer in Message.objects.turns(conversation_id, before):
        turns.append({"role": "user", "content": question})
        if answer is not None:
            turns.append({"role": "assistant", "content": answer})
    values = ModelSettings.objects.values_of(model if model is not None else _served())
    system, params = chat_defaults(values, settings.GANTRY_MAX_ANSWER_TOKENS)
    return Prompt(turns + [{"role": "user", "content": content}], system, params)


def asked(request: dict[str, Any], model: str | None = None, values: Values | None = None) -> Prompt:
    """What to send TabbyAPI for a request of the OpenAI-compatible API (`{"messages"}` or `{"prompt"}`,
    and `params`, its generation fields): as its caller wrote it, the fields it leaves unset taken from
    the settings of `model` as for chat (a chat without a system message gets the model's system
    prompt); the answer is never longer than GANTRY_MAX_ANSWER_TOKENS. `values`: the model's settings,
    when they were read already (no database work then)."""
    if values is None:
        values = ModelSettings.objects.values_of(model if model is not None else _served())
    system, defaults = chat_defaults(values, settings.GANTRY_MAX_ANSWER_TOKENS)
    params = {**defaults, **request.get("params", {})}
    params["max_tokens"] = min(int(params["max_tokens"]), defaults["max_tokens"])
    if "prompt" in request:
        return Prompt([], "", params, text=str(request["prompt"]), fixed=True)
    turns = [dict(turn) for turn in request["messages"]]
    if any(turn["role"] == "system" for turn in turns):
        system = ""
    return Prompt(turns, system, params, fixed=True)


def _served() -> Any:
    return Subquery(Backend.objects.filter(name="default").values("active_model")[:1])
