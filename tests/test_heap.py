"""The web process freezes what its imports built: the garbage collector's full passes, which hold every
socket's relay while they run, walk only what the requests create."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness.tabby_server import ROOT

SCRIPT = """
import gc, json
import gantry.asgi
print(json.dumps({"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""


def test_the_web_process_starts_with_its_imports_frozen(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GANTRY_", "SECRET_KEY", "DATABASE_URL", "REDIS_URL"))}
    env = {**base, "PYTHONPATH": str(ROOT), "DJANGO_SETTINGS_MODULE": "gantry.settings", "GANTRY_VAR_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["frozen"] > 50_000  # Django, Channels, the apps
    assert counts["tracked"] < counts["frozen"] // 20
