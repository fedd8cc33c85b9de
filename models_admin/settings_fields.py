"""A model's settings: what each may hold, checked the same way for the API, the dashboard's form and a
fleet file, and what they become in requests to TabbyAPI.

Load parameters go with every `POST /v1/model/load` of the model (TabbyAPI's field names and types);
generation defaults fill what a chat request leaves unset; the system prompt goes first in the
conversation sent. A setting left out (or null) is not sent: TabbyAPI's or the model's own default applies.
Policies (models_admin.policies) say what Gantry itself does with the model (keep it, unload it when idle,
load it at start); they never go to TabbyAPI.
Plain Python (no Django): the caller hands in the site's answer length cap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Values = dict[str, Any]
NAME = re.compile(r"^[^/\\\x00]{1,200}$")
CACHE_MODES = ("FP16", "Q8", "Q6", "Q4")
SYSTEM_PROMPT_CHARS = 32_000
LOAD, GENERATION, POLICY = "load", "generation", "policy"
ROLES = ("nobody", "admins", "everyone")  # who may have a model loaded by asking for it
LONGEST_SECONDS = 31_536_000  # a year: the longest time a policy counts


class SettingsInvalid(ValueError):
    """Some settings cannot be saved: a sentence per field, by field name."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__(" ".join(self.errors.values()))


@dataclass(frozen=True)
class Field:
    name: str
    group: str
    label: str
    help: str
    # Turns a value (JSON's types) into the stored one, or returns the sentence saying what is wrong.
    check: Callable[[str, Any], Any]
    # The form's choices (value, label) when it offers a list; empty: a text field.
    choices: tuple[tuple[str, str], ...] = ()


YES_NO = (("", "default"), ("true", "yes"), ("false", "no"))


class Refused(ValueError):
    pass


def _number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Refused(f"{name} must be a number.")
    if value > high or value < low or (low_open and value == low):
        lower = f"more than {low:g}" if low_open else f"at least {low:g}"
        raise Refused(f"{name} must be {lower} and at most {high:g}.")
    return float(value)


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise Refused(f"{name} must be a whole number.")
    if not low <= value <= high:
        raise Refused(f"{name} must be from {low:,} to {high:,}.")
    return int(value)


def _name(name: str, value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value.strip()) or value.strip() in (".", ".."):
        raise Refused(f"{name} must be the name of {what} (1 to 200 characters, no slash).")
    return value.strip()


def tokens(low: int, high: int = 1_048_576, multiple: int = 1) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        number = _whole(name, value, low, high)
        if number % multiple:
            raise Refused(f"{name} must be a multiple of {multiple} (say {math.ceil(number / multiple) * multiple}).")
        return number

    return check


def number(low: float, high: float, low_open: bool = False) -> Callable[[str, Any], float]:
    return lambda name, value: _number(name, value, low, high, low_open)


def cache_mode(name: str, value: Any) -> str:
    mode = value.strip().upper() if isinstance(value, str) else None
    if mode not in CACHE_MODES:
        raise Refused(f"{name} must be one of {', '.join(CACHE_MODES)}.")
    return mode


def rope_alpha(name: str, value: Any) -> float | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _number(name, value, 0, 100, low_open=True)
    except Refused:
        raise Refused(f'{name} must be a number more than 0 and at most 100, or "auto".') from None


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise Refused(f"{name} must be true or false.")
    return value


def gpu_split(name: str, value: Any) -> list[float]:
    if not isinstance(value, list) or not 1 <= len(value) <= 16:
        raise Refused(f"{name} must be a list of 1 to 16 numbers: the GB of memory to use on each GPU, in order.")
    try:
        return [_number(name, gb, 0, 10_000) for gb in value]
    except Refused:
        raise Refused(f"{name} must list numbers of GB from 0 to 10,000, one per GPU.") from None


def seconds(name: str, value: Any) -> int:
    try:
        return _whole(name, value, 1, LONGEST_SECONDS)
    except Refused:
        raise Refused(f"{name} must be a whole number of seconds from 1 to {LONGEST_SECONDS:,} (a year), or empty.") from None


def role(name: str, value: Any) -> str:
    who = value.strip().lower() if isinstance(value, str) else None
    if who not in ROLES:
        raise Refused(f"{name} must be one of {', '.join(ROLES)}.")
    return who


def text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise Refused(f"{name} must be text.")
    if len(value) > SYSTEM_PROMPT_CHARS:
        raise Refused(f"{name} has {len(value):,} characters; the limit is {SYSTEM_PROMPT_CHARS:,}.")
    if "\x00" in value:
        raise Refused(f"{name} must not contain a NUL character.")
    return value.strip()


FIELDS = (
    Field("max_seq_len", LOAD, "Context length", "Tokens of context; empty: the model's own.", tokens(16)),
    Field("cache_mode", LOAD, "Cache mode", "FP16, Q8, Q6 or Q4 (quantised caches hold more).", cache_mode),
    Field(
        "cache_size",
        LOAD,
        "Cache size",
        "Tokens the cache holds, a multiple of 256, at least the context.",
        tokens(256, multiple=256),
    ),
    Field("chunk_size", LOAD, "Chunk size", "Prompt tokens read in one step.", tokens(16)),
    Field(
        "rope_scale",
        LOAD,
        "RoPE scale",
        "Linear position scaling (2 stretches the context twofold).",
        number(0, 64, low_open=True),
    ),
    Field("rope_alpha", LOAD, "RoPE alpha", 'NTK scaling of the positions, or "auto".', rope_alpha),
    Field(
        "draft_model",
        LOAD,
        "Draft model",
        "A model folder used for speculative decoding.",
        lambda name, value: _name(name, value, "a model folder"),
    ),
    Field(
        "prompt_template",
        LOAD,
        "Prompt template",
        "A template name; empty: the model's own.",
        lambda name, value: _name(name, value, "a template"),
    ),
    Field("gpu_split_auto", LOAD, "Split across GPUs automatically", "TabbyAPI's default is yes.", boolean, YES_NO),
    Field("gpu_split", LOAD, "GPU split", "GB on each GPU, e.g. 20, 24 (with automatic split off).", gpu_split),
    Field("temperature", GENERATION, "Temperature", "0 picks the likeliest token; higher is more varied.", number(0, 5)),
    Field(
        "top_p", GENERATION, "Top P", "Sample from the likeliest tokens making up this probability.", number(0, 1, low_open=True)
    ),
    Field("top_k", GENERATION, "Top K", "Sample from this many likeliest tokens; 0 is off.", tokens(0)),
    Field("min_p", GENERATION, "Min P", "Drop tokens less likely than this share of the likeliest.", number(0, 1)),
    Field(
        "repetition_penalty",
        GENERATION,
        "Repetition penalty",
        "Above 1 discourages repeating tokens.",
        number(0, 10, low_open=True),
    ),
    Field("max_tokens", GENERATION, "Longest answer", "Tokens; at most the site's GANTRY_MAX_ANSWER_TOKENS.", tokens(1)),
    Field("system_prompt", GENERATION, "System prompt", "Sent first in every conversation with this model.", text),
    Field(
        "pinned",
        POLICY,
        "Pinned",
        "Never unloaded by Gantry itself (when idle, or to load another model); an admin still can. Default no.",
        boolean,
        YES_NO,
    ),
    Field(
        "idle_unload_after",
        POLICY,
        "Unload when idle after",
        "Seconds without a request on a backend holding it, then Gantry unloads it there; empty: never.",
        seconds,
    ),
    Field("preload", POLICY, "Preload", "Loaded when Gantry starts, on a backend holding nothing; default no.", boolean, YES_NO),
    Field("min_residency", POLICY, "Minimum residency", "Seconds it stays loaded at least before Gantry may unload it.", seconds),
    Field(
        "load_on_request",
        POLICY,
        "Loaded on request by",
        "Who may have it loaded by asking for it; default admins.",
        role,
        (("", "default (admins)"), ("nobody", "nobody"), ("admins", "admins"), ("everyone", "everyone")),
    ),
)
BY_NAME = {field.name: field for field in FIELDS}


def clean(body: object, max_answer_tokens: int) -> Values:
    """The settings to store, from a JSON object naming only known settings (null or "" leaves one unset);
    raises SettingsInvalid with a sentence for each field that is wrong."""
    if not isinstance(body, dict):
        raise SettingsInvalid({"": 'Send the settings as a JSON object, like {"max_seq_len": 4096, "temperature": 0.7}.'})
    errors: dict[str, str] = {}
    values: Values = {}
    for key, value in body.items():
        field = BY_NAME.get(key) if isinstance(key, str) else None
        if field is None:
            errors[str(key)] = f"{key} is not a model setting; the settings are {', '.join(BY_NAME)}."
        elif value is not None and value != "":
            try:
                values[key] = field.check(key, value)
            except Refused as exc:
                errors[key] = str(exc)
    values = {key: value for key, value in values.items() if value != ""}
    errors.update({k: v for k, v in _together(values, max_answer_tokens).items() if k not in errors})
    if errors:
        raise SettingsInvalid(errors)
    return {field.name: values[field.name] for field in FIELDS if field.name in values}


def _together(values: Values, max_answer_tokens: int) -> dict[str, str]:
    """What is wrong with settings that are fine one by one but not together."""
    errors = {}
    if "cache_size" in values and "max_seq_len" in values and values["cache_size"] < values["max_seq_len"]:
        errors["cache_size"] = (
            f"cache_size ({values['cache_size']:,}) is smaller than max_seq_len ({values['max_seq_len']:,}): a whole "
            "context must fit in the cache. Raise cache_size or lower max_seq_len."
        )
    if "gpu_split" in values and values.get("gpu_split_auto") is not False:
        errors["gpu_split"] = (
            "gpu_split is used only when gpu_split_auto is false (TabbyAPI splits automatically otherwise); set it to false."
        )
    if values.get("max_tokens", 0) > max_answer_tokens:
        errors["max_tokens"] = (
            f"max_tokens must be at most {max_answer_tokens:,}, the site's longest answer (GANTRY_MAX_ANSWER_TOKENS)."
        )
    return errors


def every_field(values: Mapping[str, Any]) -> Values:
    """Every setting, null where unset (the API's and the form's view)."""
    return {field.name: values.get(field.name) for field in FIELDS}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """{setting: [before, after]} for each setting that differs (None: unset)."""
    return {f.name: [old.get(f.name), new.get(f.name)] for f in FIELDS if old.get(f.name) != new.get(f.name)}


def load_request(values: Mapping[str, Any]) -> Values:
    """The fields of `POST /v1/model/load` the settings set (TabbyAPI takes the draft model as an object)."""
    fields = {f.name: values[f.name] for f in FIELDS if f.group == LOAD and f.name in values}
    if "draft_model" in fields:
        fields["draft_model"] = {"draft_model_name": fields["draft_model"]}
    return fields


def chat_defaults(values: Mapping[str, Any], max_answer_tokens: int) -> tuple[str, Values]:
    """(system prompt, sampling fields of a chat request); the answer length is capped by the site's."""
    params = {f.name: values[f.name] for f in FIELDS if f.group == GENERATION and f.name in values and f.name != "system_prompt"}
    params["max_tokens"] = min(int(params.get("max_tokens", max_answer_tokens)), max_answer_tokens)
    return str(values.get("system_prompt") or ""), params
