"""Engine selection. exllamav2 is imported only by its own module, and only when selected."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tabby.engines.base import Engine, LoadOptions

BACKENDS = ("auto", "torch", "exllamav2")


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_backend(backend: str) -> str:
    """`auto` means exllamav2 where CUDA and exllamav2 are there, else the torch CPU engine."""
    if backend == "auto":
        return "exllamav2" if cuda_available() and importlib.util.find_spec("exllamav2") else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    return backend


def create_engine(backend: str, model_dir: Path, options: LoadOptions) -> Engine:
    """Build (not load) the engine for a model folder; raises ModelFolderError for a bad folder."""
    if resolve_backend(backend) == "exllamav2":
        from tabby.engines.exllamav2 import ExLlamaV2Engine

        return ExLlamaV2Engine(model_dir, options)
    from tabby.engines.torch_engine import TorchEngine

    return TorchEngine(model_dir, options)
