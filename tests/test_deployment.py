"""The production files are valid: docker-compose.yml parses, and .env.example names every setting."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("Neither `docker compose` nor `docker-compose` is installed; `make test` installs Debian's docker-compose.")


def compose_config(folder: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """`compose config` on docker-compose.yml with .env made from .env.example, `settings` filled in as an
    operator would."""
    shutil.copy(ROOT / "docker-compose.yml", folder / "docker-compose.yml")
    env = (ROOT / ".env.example").read_text()
    for name, value in settings.items():
        env, found = re.subn(rf"^#? ?{name}=.*$", f"{name}={value}", env, flags=re.MULTILINE)
        assert found, f"{name} is not in .env.example"
    (folder / ".env").write_text(env)
    clean = {
        k: v for k, v in os.environ.items() if k not in {"POSTGRES_PASSWORD", "PUBLISH_ADDRESS", "PORT", "TRUST_PROXY_HEADERS"}
    }
    return subprocess.run(
        [*compose_command(), "config"], check=False, cwd=folder, capture_output=True, text=True, timeout=60, env=clean
    )


def test_docker_compose_config_validates(tmp_path: Path) -> None:
    result = compose_config(tmp_path, POSTGRES_PASSWORD="a-long-random-password")
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


def test_compose_refuses_to_start_without_a_database_password(tmp_path: Path) -> None:
    result = compose_config(tmp_path)  # .env.example leaves it empty
    assert result.returncode != 0
    assert "Set POSTGRES_PASSWORD in .env" in result.stderr


def published(config: str) -> list[str]:
    """The web service's published ports as `address:published:target`, from either compose's output."""
    ports = yaml.safe_load(config)["services"]["web"]["ports"]
    as_text = [p if isinstance(p, str) else f"{p.get('host_ip', '')}:{p['published']}:{p['target']}" for p in ports]
    return [p.removesuffix("/tcp") for p in as_text]


def test_compose_publishes_the_site_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    default = compose_config(tmp_path, POSTGRES_PASSWORD="secret-1")
    assert default.returncode == 0, default.stderr
    assert published(default.stdout) == ["127.0.0.1:8000:8000"]
    told = compose_config(tmp_path, POSTGRES_PASSWORD="secret-1", PUBLISH_ADDRESS="0.0.0.0", PORT="8080")
    assert told.returncode == 0, told.stderr
    assert published(told.stdout) == ["0.0.0.0:8080:8000"]


def test_compose_trusts_the_proxy_in_front_unless_told_otherwise(tmp_path: Path) -> None:
    default = yaml.safe_load(compose_config(tmp_path, POSTGRES_PASSWORD="secret-1").stdout)
    told = yaml.safe_load(compose_config(tmp_path, POSTGRES_PASSWORD="secret-1", TRUST_PROXY_HEADERS="false").stdout)
    assert default["services"]["web"]["environment"]["TRUST_PROXY_HEADERS"] == "true"
    assert told["services"]["web"]["environment"]["TRUST_PROXY_HEADERS"] == "false"
    # Daphne's own --proxy-headers would trust them whatever the setting says.
    assert "--proxy-headers" not in default["services"]["web"]["command"]


def django_start(env: dict[str, str], code: str = "") -> subprocess.CompletedProcess[str]:
    """A fresh Python process that sets Django up with `env` (after running `code`)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GANTRY_", "SECRET_KEY", "DATABASE_URL", "REDIS_URL"))}
    full = {**base, "PYTHONPATH": str(ROOT), "DJANGO_SETTINGS_MODULE": "gantry.settings", **env}
    script = f"{code}\nimport django\ndjango.setup()\nprint('started')"
    return subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=ROOT, env=full, capture_output=True, text=True, timeout=120
    )


def test_the_placeholder_secret_key_of_env_example_is_refused(tmp_path: Path) -> None:
    match = re.search(r"^SECRET_KEY=(.+)$", (ROOT / ".env.example").read_text(), re.MULTILINE)
    assert match, ".env.example has no SECRET_KEY line"
    for extra in ({}, {"DATABASE_URL": "postgresql://gantry:secret@127.0.0.1:1/gantry"}):
        result = django_start({"SECRET_KEY": match.group(1), "GANTRY_VAR_DIR": str(tmp_path), **extra})
        assert result.returncode != 0
        assert "SECRET_KEY is still the placeholder of .env.example" in result.stderr
    accepted = django_start({"SECRET_KEY": "a-real-secret-of-this-site", "GANTRY_VAR_DIR": str(tmp_path)})
    assert accepted.returncode == 0, accepted.stderr


# Any chmod refused: a file made readable by others and narrowed afterwards would fail here.
NO_CHMOD = """
import os, pathlib
def refuse(*args, **kwargs):
    raise AssertionError("chmod after the fact")
os.umask(0)
os.chmod = os.fchmod = os.lchmod = pathlib.Path.chmod = refuse
"""


def test_the_embedded_secret_key_file_is_private_from_its_first_byte(tmp_path: Path) -> None:
    first = django_start({"GANTRY_VAR_DIR": str(tmp_path)}, NO_CHMOD)
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    assert len(key) >= 50
    again = django_start({"GANTRY_VAR_DIR": str(tmp_path)}, NO_CHMOD)
    assert again.returncode == 0, again.stderr
    assert key_file.read_text() == key  # kept, not made anew
    assert [p.name for p in tmp_path.iterdir() if "secret" in p.name] == ["secret_key"]  # no draft left behind


def test_the_model_servers_key_file_is_private_from_its_first_byte(tmp_path: Path) -> None:
    code = f"""{NO_CHMOD}
from pathlib import Path
from tabby.auth import load_or_create_keys
made = load_or_create_keys(Path({str(tmp_path / "api_tokens.yml")!r}))
again = load_or_create_keys(Path({str(tmp_path / "api_tokens.yml")!r}))
assert made == again, (made, again)
print("made")
"""
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "api_tokens.yml").stat().st_mode) == 0o600


def test_the_image_runs_as_a_user_that_is_not_root() -> None:
    instructions = [
        line.split(None, 1) for line in (ROOT / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")
    ]
    keywords = [parts[0].upper() for parts in instructions]
    users = [parts[1].strip() for parts in instructions if parts[0].upper() == "USER"]
    assert users, "The Dockerfile has no USER: the image would run as root."
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert max(i for i, k in enumerate(keywords) if k == "USER") < keywords.index("CMD")
    assert re.search(rf"useradd\b[^\n]*\b{re.escape(user)}\b", (ROOT / "Dockerfile").read_text()), f"{user} is never created"
