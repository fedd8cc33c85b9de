"""The production files are valid: docker-compose.yml parses, and .env.example names every setting."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
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


# Health checks and the `monitoring` profile

MONITORING = ROOT / "deploy" / "monitoring"


def compose_config(tmp_path: Path, *args: str) -> dict[str, Any]:
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    result = subprocess.run([*compose_command(), *args, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def test_the_healthchecks_ask_the_probes(tmp_path: Path) -> None:
    services = compose_config(tmp_path)["services"]
    assert services["web"]["healthcheck"]["test"] == ["CMD", "curl", "-sf", "http://127.0.0.1:8000/readyz"]
    port = services["worker"]["environment"]["GANTRY_METRICS_PORT"]
    for name in ("worker", "beat"):
        assert services[name]["healthcheck"]["test"] == ["CMD", "curl", "-sf", f"http://127.0.0.1:{port}/healthz"]


def test_the_monitoring_profile_adds_prometheus_and_grafana_with_their_files(tmp_path: Path) -> None:
    services = compose_config(tmp_path, "--profile", "monitoring")["services"]
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
    services = compose_config(tmp_path)["services"]
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
