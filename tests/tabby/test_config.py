"""Settings come from config.yml, then TABBY_* variables, then the command line; keys from api_tokens.yml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tabby.auth import load_or_create_keys
from tabby.config import ConfigError, load_config


def test_later_sources_win(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"network": {"port": 6000, "host": "0.0.0.0"}, "model": {"model_dir": "a"}}))
    config = load_config(path, environ={"TABBY_NETWORK_PORT": "7000", "TABBY_MODEL_MODEL_DIR": "b"}, overrides={"model": {"model_dir": "c"}})
    assert config.network.host == "0.0.0.0"
    assert config.network.port == 7000
    assert config.model.model_dir == "c"


def test_environment_values_are_typed(tmp_path: Path) -> None:
    config = load_config(
        tmp_path / "missing.yml",
        environ={"TABBY_NETWORK_DISABLE_AUTH": "true", "TABBY_MODEL_DUMMY_MODEL_NAMES": "a, b", "TABBY_MODEL_LOAD_THROTTLE_MBPS": "2.5"},
    )
    assert config.network.disable_auth is True
    assert config.model.dummy_model_names == ["a", "b"]
    assert config.model.load_throttle_mbps == 2.5


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TABBY_NETWORK_PORT": "five"}, "network.port"),
        ({"TABBY_NETWORK_DISABLE_AUTH": "maybe"}, "network.disable_auth"),
        ({"TABBY_MODEL_BACKEND": "cuda"}, "model.backend"),
        ({"TABBY_MODEL_COLOUR": "red"}, "model.colour"),
    ],
)
def test_a_bad_setting_is_named_in_the_error(tmp_path: Path, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(tmp_path / "missing.yml", environ=environ)


def test_missing_keys_are_generated_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    first = load_or_create_keys(path)
    second = load_or_create_keys(path)
    assert first == second
    assert len(first.admin_key) == 32 and first.api_keys[0] != first.admin_key
    assert path.stat().st_mode & 0o077 == 0


def test_api_key_may_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    path.write_text(yaml.safe_dump({"api_key": ["one", "two"], "admin_key": "boss"}))
    keys = load_or_create_keys(path)
    assert keys.is_api("two") and keys.is_api("boss") and not keys.is_admin("one")


def test_the_model_settings_are_a_loads_defaults_and_a_request_overrides_them(tmp_path: Path) -> None:
    config = load_config(tmp_path / "missing.yml", environ={"TABBY_MODEL_MAX_SEQ_LEN": "32768", "TABBY_MODEL_CACHE_MODE": "Q4"})
    defaults = config.model.load_options()
    assert (defaults.max_seq_len, defaults.cache_size, defaults.cache_mode, defaults.chunk_size) == (32768, None, "Q4", 2048)
    assert (defaults.prompt_template, defaults.load_throttle_mbps) == (None, 0.0)
    asked = config.model.load_options(max_seq_len=8192, cache_size=None, gpu_split=[20.0], load_throttle_mbps=5.0)
    assert (asked.max_seq_len, asked.cache_mode, asked.gpu_split, asked.load_throttle_mbps) == (8192, "Q4", [20.0], 5.0)
