"""The production files are valid: docker-compose.yml parses, and .env.example names every setting."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.figures import PROMISED

ROOT = Path(__file__).resolve().parents[1]


def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("Neither `docker compose` nor `docker-compose` is installed; `make test` installs Debian's docker-compose.")


def compose_config(folder: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
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
        [*compose_command(), *args, "config"], check=False, cwd=folder, capture_output=True, text=True, timeout=60, env=clean
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


# Health checks and the `monitoring` profile

MONITORING = ROOT / "deploy" / "monitoring"


def compose_services(tmp_path: Path, *args: str) -> dict[str, Any]:
    """The services `compose config` resolves (with a database password, as an operator sets one)."""
    result = compose_config(tmp_path, *args, POSTGRES_PASSWORD="a-long-random-password")
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def test_the_healthchecks_ask_the_probes(tmp_path: Path) -> None:
    services = compose_services(tmp_path)["services"]
    assert services["web"]["healthcheck"]["test"] == ["CMD", "curl", "-sf", "http://127.0.0.1:8000/readyz"]
    port = services["worker"]["environment"]["GANTRY_METRICS_PORT"]
    for name in ("worker", "beat"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "curl", "-sf", f"http://127.0.0.1:{port}/healthz"]


def test_the_monitoring_profile_adds_prometheus_and_grafana_with_their_files(tmp_path: Path) -> None:
    services = compose_services(tmp_path, "--profile", "monitoring")["services"]
    profiled = {name for name, service in services.items() if "monitoring" in service.get("profiles", [])}
    assert profiled == {"prometheus", "grafana"}
    mounts = [volume.split(":")[:2] for name in profiled for volume in services[name]["volumes"]]
    mounted = {Path(source).relative_to(tmp_path).as_posix(): target for source, target in mounts if source.startswith("/")}
    assert mounted == {
        "deploy/monitoring/prometheus.yml": "/etc/prometheus/prometheus.yml",
        "deploy/monitoring/grafana/provisioning": "/etc/grafana/provisioning",
        "deploy/monitoring/grafana/dashboards": "/etc/grafana/dashboards",
    }
    for relative in mounted:
        assert (ROOT / relative).exists(), relative
    # Prometheus reads the token from the file its entrypoint writes from the environment.
    assert "/run/gantry/metrics-token" in " ".join(services["prometheus"]["entrypoint"])
    assert "GANTRY_METRICS_TOKEN" in services["prometheus"]["environment"]


def test_prometheus_scrapes_every_gantry_process_with_the_token(tmp_path: Path) -> None:
    services = compose_services(tmp_path)["services"]
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    metrics_port = int(services["worker"]["environment"]["GANTRY_METRICS_PORT"])
    expected = {"gantry-web": ("web", 8000), "gantry-worker": ("worker", metrics_port), "gantry-beat": ("beat", metrics_port)}
    for job_name, (service, port) in expected.items():
        job = jobs[job_name]
        assert service in services
        assert job["dns_sd_configs"] == [{"names": [service], "type": "A", "port": port, "refresh_interval": "30s"}]
        assert job["metrics_path"] == "/metrics"
        assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/gantry/metrics-token"}


def test_the_dashboard_charts_what_the_issue_asks_from_served_metrics() -> None:
    datasources = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    providers = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "gantry.yml").read_text())
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "gantry.json").read_text())
    panels = {panel["title"]: panel for panel in dashboard["panels"] if panel["type"] != "row"}
    uid = datasources["datasources"][0]["uid"]
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    assert all(panel["datasource"]["uid"] == uid for panel in panels.values())
    charted = {
        "Switch timeline": {"gantry_backend_active_model", "gantry_backend_state"},
        "Load time by model (latest)": {"gantry_model_last_load_seconds"},
        "Load time by model (mean)": {"gantry_model_load_seconds_sum", "gantry_model_load_seconds_count"},
        "Queue depth and answers running": {"gantry_queue_depth", "gantry_generations_running"},
        "First token by model": {"gantry_generation_first_token_seconds_bucket"},
        "Tokens per second by model": {"gantry_generation_tokens_per_second_sum", "gantry_generation_tokens_per_second_count"},
    }
    for title, names in charted.items():
        assert names <= named_metrics(panels[title]), title
    served = {name + suffix for name in PROMISED for suffix in ("", "_bucket", "_sum", "_count")}
    used = set().union(*(named_metrics(panel) for panel in panels.values())) - {"up"}
    assert used <= served, used - served


def named_metrics(panel: dict[str, Any]) -> set[str]:
    return {name for target in panel["targets"] for name in re.findall(r"\b(gantry_[a-z_]+|up)\b", target["expr"])}


def test_the_image_holds_every_package_the_project_installs() -> None:
    """The Dockerfile copies each top-level package of pyproject's `include` (an app left out of the image
    would fail its start on Django's INSTALLED_APPS)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = sorted(pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"])
    copied = set(re.findall(r"^COPY (\w+) \1$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE))
    assert [name for name in packages if name not in copied] == []
