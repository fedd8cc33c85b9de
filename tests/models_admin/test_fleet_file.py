"""`manage.py export_fleet` and `import_fleet`: a fleet (backends without keys, model settings) in one YAML
file, read back as it was written; a wrong file changes nothing and says every problem."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from django.core.management import CommandError, call_command

from models_admin.model_settings import ModelSettings, SettingsChange
from models_admin.models import Backend

pytestmark = pytest.mark.django_db

FLEET = """\
version: 1
backends:
  - name: default
    url: http://127.0.0.1:5000
  - name: gpu-2
    url: http://10.0.0.2:5000/
models:
  Tiny-Chat-5M:
    max_seq_len: 1024
    cache_mode: q4
    temperature: 0.2
    system_prompt: Answer in one sentence.
  Small-Chat-200M:
    rope_alpha: auto
    gpu_split_auto: false
    gpu_split: [20, 24]
"""


def run(name: str, *args: str) -> str:
    out = io.StringIO()
    call_command(name, *args, stdout=out)
    return out.getvalue()


def state() -> tuple[list[tuple[str, str]], dict[str, dict[str, object]], int]:
    backends = list(Backend.objects.order_by("name").values_list("name", "base_url"))
    return backends, {m.model_name: m.values for m in ModelSettings.objects.all()}, SettingsChange.objects.count()


def test_an_imported_fleet_is_exported_as_it_was_read_and_imports_again_unchanged(tmp_path: Path) -> None:
    Backend.objects.create(name="default", base_url="http://127.0.0.1:9999")
    source = tmp_path / "fleet.yaml"
    source.write_text(FLEET)

    report = run("import_fleet", str(source))
    # The default backend is TABBY_HOST's server: a file names it but does not move it.
    assert "backend default: its URL comes from TABBY_HOST (http://127.0.0.1:9999); http://127.0.0.1:5000 not taken" in report
    assert "backend gpu-2: added (http://10.0.0.2:5000); give it its keys in the Backends tab" in report
    assert "Tiny-Chat-5M: max_seq_len unset → 1024" in report
    assert report.strip().endswith("1 backend added, 0 updated, settings of 2 models changed, 1 unchanged.")
    backends, models, audited = state()
    assert backends == [("default", "http://127.0.0.1:9999"), ("gpu-2", "http://10.0.0.2:5000")]
    assert models["Tiny-Chat-5M"] == {
        "max_seq_len": 1024,
        "cache_mode": "Q4",
        "temperature": 0.2,
        "system_prompt": "Answer in one sentence.",
    }
    assert audited == 2 and set(SettingsChange.objects.values_list("source", flat=True)) == {"command"}

    exported = tmp_path / "exported.yaml"
    assert run("export_fleet", "--output", str(exported)).strip() == f"Fleet written to {exported}."
    data = yaml.safe_load(exported.read_text())
    assert data["backends"] == [
        {"name": "default", "url": "http://127.0.0.1:9999"},
        {"name": "gpu-2", "url": "http://10.0.0.2:5000"},
    ]
    assert data["models"] == models
    assert "_key" not in exported.read_text()  # never a key

    again = run("import_fleet", str(exported))
    assert again.strip() == f"Imported {exported}: 0 backends added, 0 updated, settings of 0 models changed, 4 unchanged."
    assert state() == (backends, models, audited)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("version: 1\nbackends: [\n", "The file is not valid YAML"),
        ("- just a list\n", "The file must be a mapping with `version`, `backends` and `models`."),
        ("version: 2\n", "This file is version 2; this Gantry reads version 1."),
        ("version: 1\nbackend: []\n", "`backend` is not part of a fleet file"),
        (
            "backends:\n  - name: a\n    url: http://a:1\n    api_key: secret\n",
            "backends, item 1: `api_key` is not a backend field here",
        ),
        ("backends:\n  - name: a\n", "backends, item 1: `url` is missing."),
        ("backends:\n  - name: a\n    url: ftp://a\n", "backends, item 1: url must be an http:// or https:// address"),
        ("backends:\n  - name: GPU 2\n    url: http://a:1\n", "backends, item 1: a backend's name is 1 to 64 lowercase letters"),
        (
            "backends:\n  - {name: a, url: 'http://a:1'}\n  - {name: a, url: 'http://b:1'}\n",
            "backends, item 2: the name a is used twice.",
        ),
        ("models:\n  Tiny-Chat-5M:\n    max_seq_len: lots\n", "models, Tiny-Chat-5M: max_seq_len must be a whole number."),
        ("models:\n  Tiny-Chat-5M:\n    colour: blue\n", "models, Tiny-Chat-5M: colour is not a model setting"),
        ("models:\n  - Tiny-Chat-5M\n", "`models` must map each model's name to its settings."),
    ],
)
def test_a_wrong_fleet_file_is_refused_whole_naming_each_problem(tmp_path: Path, text: str, problem: str) -> None:
    Backend.objects.create(name="default", base_url="http://127.0.0.1:9999")
    ModelSettings.objects.create(model_name="Tiny-Chat-5M", values={"temperature": 0.9})
    before = state()
    # A good part beside the bad one: nothing of it is written either.
    good = "models:\n  Small-Chat-200M:\n    top_k: 5\n" if text.startswith("backends") else ""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + good)
    with pytest.raises(CommandError) as refused:
        run("import_fleet", str(bad))
    assert f"{bad} was not imported; nothing changed:" in str(refused.value)
    assert problem in str(refused.value)
    assert state() == before


def test_every_problem_of_a_file_is_named_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  - name: a\nmodels:\n  Tiny-Chat-5M:\n    top_p: 3\n    cache_size: 100\n")
    with pytest.raises(CommandError) as refused:
        run("import_fleet", str(bad))
    lines = [line for line in str(refused.value).splitlines() if line.startswith("- ")]
    assert len(lines) == 3, lines


def test_a_dry_run_reports_and_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "fleet.yaml"
    source.write_text(FLEET)
    report = run("import_fleet", str(source), "--dry-run")
    # The default backend is TABBY_HOST's own, made from the settings: a file never adds it.
    assert "Would import (dry run, nothing written): 1 backend added, 0 updated" in report
    assert state() == ([], {}, 0)
