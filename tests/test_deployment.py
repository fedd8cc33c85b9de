"""The production files are valid: docker-compose.yml parses, and .env.example names every setting."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("Neither `docker compose` nor `docker-compose` is installed; `make test` installs Debian's docker-compose.")


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    result = subprocess.run([*compose_command(), "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for service in ("postgres", "redis", "web", "worker", "beat", "tabby"):
        assert re.search(rf"^  {service}:$", result.stdout, re.MULTILINE), service
    assert "driver: nvidia" in result.stdout


def test_every_setting_is_in_env_example_and_the_readme() -> None:
    settings_source = (ROOT / "gantry" / "settings.py").read_text()
    names = set(re.findall(r'env_(?:str|bool|int|float|list)\("([A-Z_]+)"', settings_source))
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    assert names, "no settings found"
    for name in sorted(names - {"GANTRY_VAR_DIR", "STATIC_ROOT"}):
        assert re.search(rf"^#? ?{name}=", example, re.MULTILINE), f"{name} is missing from .env.example"
    for name in sorted(names):
        assert f"`{name}`" in readme, f"{name} is missing from the README's settings table"
