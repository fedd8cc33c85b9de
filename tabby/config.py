"""Server settings: `config.yml`, then `TABBY_<SECTION>_<KEY>` variables, then the command line.

Later sources win, as in TabbyAPI. Only the keys Gantry's server understands are accepted; an
unknown key or a value of the wrong type stops the server with a sentence naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from tabby.engines.base import LoadOptions


class ConfigError(ValueError):
    """A setting has a bad value; the message names it."""


@dataclass
class NetworkConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    disable_auth: bool = False
    sse_ping_interval: float = 15.0
    send_tracebacks: bool = False


@dataclass
class ModelConfig:
    model_dir: str = "models"
    # Loaded when the server starts; empty means start with nothing loaded.
    model_name: str = ""
    backend: str = "auto"  # auto | torch | exllamav2
    max_seq_len: int = 0  # 0 = the model's own
    cache_size: int = 0
    cache_mode: str = "FP16"
    chunk_size: int = 2048
    prompt_template: str = ""
    use_dummy_models: bool = False
    dummy_model_names: list[str] = field(default_factory=lambda: ["gpt-3.5-turbo"])
    inline_model_loading: bool = False
    # Simulates a slow disk (MB/s, 0 = off) so demos and tests can hold a load open for a known time.
    load_throttle_mbps: float = 0.0
    # Longest wait for running generations before an unload (or a load of another model) cancels them.
    unload_timeout: float = 30.0

    def load_options(self, **request: Any) -> LoadOptions:
        """These settings as a load's options, overridden by what a load request sets (None: not set)."""
        defaults = LoadOptions(
            max_seq_len=self.max_seq_len or None,
            cache_size=self.cache_size or None,
            cache_mode=self.cache_mode or None,
            chunk_size=self.chunk_size or None,
            prompt_template=self.prompt_template or None,
            load_throttle_mbps=self.load_throttle_mbps,
        )
        return replace(defaults, **{key: value for key, value in request.items() if value is not None})


@dataclass
class DeveloperConfig:
    # Torch intra-op threads for the CPU engine (0 = torch's default).
    cpu_threads: int = 0


@dataclass
class Config:
    network: NetworkConfig = field(default_factory=NetworkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    developer: DeveloperConfig = field(default_factory=DeveloperConfig)

    @property
    def model_path(self) -> Path:
        return Path(self.model.model_dir)


SECTIONS = ("network", "model", "developer")


def _coerce(section: str, key: str, current: Any, value: Any) -> Any:
    """Turn `value` (from YAML, the environment or the command line) into the type of `current`."""
    name = f"{section}.{key}"
    try:
        if isinstance(current, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, list):
            if isinstance(value, str):
                text = value.strip()
                parsed = json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
                return [str(v) for v in parsed]
            return [str(v) for v in value]
        return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"Setting {name} has the bad value {value!r}: expected {type(current).__name__}.") from None


def _apply(config: Config, section: str, values: Mapping[str, Any], source: str) -> None:
    target = getattr(config, section)
    known = {f.name for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"Unknown setting {section}.{key} in {source}.")
        setattr(target, key, _coerce(section, key, getattr(target, key), value))


def load_config(
    path: Path | None = None, environ: Mapping[str, str] | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> Config:
    config = Config()
    if path is not None and path.exists():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must be a mapping of sections.")
        for section, values in data.items():
            if section not in SECTIONS or not isinstance(values, dict):
                raise ConfigError(f"Unknown section {section!r} in {path}; expected one of {', '.join(SECTIONS)}.")
            _apply(config, section, values, str(path))
    environ = os.environ if environ is None else environ
    for section in SECTIONS:
        prefix = f"TABBY_{section.upper()}_"
        values = {k[len(prefix):].lower(): v for k, v in environ.items() if k.startswith(prefix)}
        _apply(config, section, values, "the environment")
    for section, values in (overrides or {}).items():
        _apply(config, section, {k: v for k, v in values.items() if v is not None}, "the command line")
    if config.model.backend not in ("auto", "torch", "exllamav2"):
        raise ConfigError(f"Setting model.backend must be auto, torch or exllamav2, not {config.model.backend!r}.")
    return config
