"""Chat templates: find a model's Jinja2 template and render messages with it.

Engine-independent, so every engine renders prompts the way TabbyAPI does
(`common/templating.py`): same lookup order, same sandbox, same globals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

# Gantry's own `templates/` holds HTML pages, so the server's named chat templates live apart.
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

# TabbyAPI reports templates read from JSON files under this name; the model card shows it.
FROM_TOKENIZER_CONFIG = "from_tokenizer_config"


class ChatTemplateError(ValueError):
    """The chat template is missing, broken, or refused the messages (`raise_exception`)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A template's name (shown in the model card) and its Jinja2 source."""

    name: str
    source: str


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_tokenizer_config(model_dir: Path) -> dict[str, Any]:
    return read_json_file(model_dir / "tokenizer_config.json")


def _read_jinja(path: Path) -> ChatTemplate | None:
    try:
        return ChatTemplate(path.stem, path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def _from_json(path: Path, name: str | None = None) -> ChatTemplate | None:
    """`chat_template` of a JSON file: a string, or a list of {name, template} (first, or the one named)."""
    value = read_json_file(path).get("chat_template")
    if isinstance(value, str) and value and name is None:
        return ChatTemplate(FROM_TOKENIZER_CONFIG, value)
    if not isinstance(value, list):
        return None
    entries = [e for e in value if isinstance(e, dict) and isinstance(e.get("template"), str)]
    if name is not None:
        entries = [e for e in entries if e.get("name") == name]
    if not entries:
        return None
    return ChatTemplate(str(entries[0].get("name") or name or FROM_TOKENIZER_CONFIG), entries[0]["template"])


def _named_file(templates_dir: Path | None, name: str) -> ChatTemplate | None:
    stem = name.removesuffix(".jinja")
    # The name comes from a load request: never let it leave the templates folder.
    if templates_dir is None or not stem or Path(stem).name != stem:
        return None
    return _read_jinja(templates_dir / f"{stem}.jinja")


def _matching_folder_name(templates_dir: Path | None, model_dir: Path) -> ChatTemplate | None:
    """The bundled template whose name is part of the model folder's name (the longest such name)."""
    if templates_dir is None or not templates_dir.is_dir():
        return None
    folder = model_dir.name.lower()
    matches = [p for p in templates_dir.glob("*.jinja") if p.stem.lower() in folder]
    if not matches:
        return None
    return _read_jinja(max(matches, key=lambda p: (len(p.stem), p.stem)))


def find_chat_template(
    model_dir: Path, name: str | None = None, templates_dir: Path | None = TEMPLATES_DIR
) -> ChatTemplate | None:
    """The model's chat template, looked up in TabbyAPI's order; None when there is none."""
    lookups: list[Callable[[], ChatTemplate | None]] = []
    if name:
        lookups += [
            lambda: _named_file(templates_dir, name),
            lambda: _from_json(model_dir / "tokenizer_config.json", name),
        ]
    lookups += [
        lambda: _read_jinja(model_dir / "tabby_template.jinja"),
        lambda: _read_jinja(model_dir / "chat_template.jinja"),
        lambda: _from_json(model_dir / "chat_template.json"),
        lambda: _from_json(model_dir / "tokenizer_config.json"),
        lambda: _matching_folder_name(templates_dir, model_dir),
    ]
    for lookup in lookups:
        found = lookup()
        if found is not None:
            return found
    return None


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = True) -> Markup:
    # Jinja's own `tojson` has no `ensure_ascii`, which some model templates pass.
    return Markup(json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=(",", ": ")))


def compile_chat_template(template: ChatTemplate) -> jinja2.Template:
    """Compile in the sandbox TabbyAPI uses; a syntax error becomes a ChatTemplateError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template.source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"The chat template '{template.name}' is not valid Jinja2: {exc}") from None


def render_chat_template(
    template: jinja2.Template,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    special_tokens: dict[str, str],
    template_vars: dict[str, Any] | None = None,
) -> str:
    """Render `messages`; request variables come first so they cannot replace the messages or tokens."""
    context: dict[str, Any] = {"tools": None, "functions": None, **(template_vars or {})}
    context.update(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
    try:
        return template.render(**context)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"The chat template could not render these messages: {exc}") from None
