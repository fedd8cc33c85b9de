"""Model folders on disk: whether one is whole, and writing one so that it appears only once whole.

A folder is written hidden, named after the writing process, then renamed: a server listing the model
directory never sees half a model, and an interrupted run's leftovers are removed by the next run.
Both the demo-model maker and the real-model fetcher write their folders this way.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

NEEDED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _weight_files(folder: Path) -> list[Path] | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a whole model (config, tokenizer and every weight file)."""
    if not all((folder / name).is_file() for name in NEEDED_FILES):
        return False
    weight_files = _weight_files(folder)
    return weight_files is not None and all(path.is_file() for path in weight_files)


def partial_folder(target: Path, name: str) -> Path:
    # Hidden, and named after the writing process so a later run can tell a dead one's leftovers.
    return target / f".{name}.partial-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path, name: str) -> None:
    for leftover in target.glob(f".{name}.partial-*"):
        pid_text = leftover.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and (int(pid_text) == os.getpid() or not _process_alive(int(pid_text))):
            shutil.rmtree(leftover, ignore_errors=True)


def write_whole(final: Path, write: Callable[[Path], T], complete: Callable[[Path], bool] = is_complete) -> T | None:
    """Have `write` fill a hidden folder (which it creates), then rename that folder to `final`.

    Returns what `write` returned, or None when another run finished `final` first. On any failure
    the hidden folder is removed, so nothing half-written is left behind.
    """
    remove_stale_partials(final.parent, final.name)
    partial = partial_folder(final.parent, final.name)
    try:
        result = write(partial)
        # The rename is what makes the model visible: an interrupted run leaves only the hidden partial.
        os.rename(partial, final)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if complete(final):  # another run finished it first
            return None
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result
