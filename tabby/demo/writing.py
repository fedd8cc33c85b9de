"""Writing the demo model folders: config, tokenizer and sharded safetensors weights.

A folder appears under its final name only once it is whole (`tabby.folders.write_whole`), so a
server listing the model directory never sees half a model.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from tabby.demo.specs import (
    BOS_TOKEN_ID,
    BYTES_PER_PARAMETER,
    DEMO_MODELS,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    DemoModel,
    numel,
    weight_shapes,
)
from tabby.demo.tokenizer import Tokenizers, special_tokens_map, tokenizer_config
from tabby.folders import is_complete, write_json, write_whole

MAX_SHARD_BYTES = 512 * 10**6


def _make_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float32)
    if len(shape) == 1:  # RMSNorm scales
        return torch.ones(shape, dtype=torch.float32)
    # Seeded per tensor name, so a tensor's values do not depend on how shards are cut.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)


def _plan_shards(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = numel(shape) * BYTES_PER_PARAMETER
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


def _write_weights(folder: Path, spec: DemoModel) -> int:
    """Write the safetensors file(s), one shard in memory at a time; return the bytes of weights."""
    from safetensors.torch import save_file

    shapes = weight_shapes(spec)
    shards = _plan_shards(shapes, MAX_SHARD_BYTES)
    file_names = _shard_file_names(len(shards))
    for file_name, names in zip(file_names, shards):
        tensors = {name: _make_tensor(name, shapes[name], spec.seed) for name in names}
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        del tensors
        # safetensors creates its files owner-only; a server running as another user must read them.
        os.chmod(folder / file_name, 0o644)
    total = sum(numel(shape) for shape in shapes.values()) * BYTES_PER_PARAMETER
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, names in zip(file_names, shards) for name in names}
        write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


def _write_folder(folder: Path, spec: DemoModel, tokenizer_json: str) -> int:
    folder.mkdir()
    write_json(folder / "config.json", spec.config())
    generation = {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID}
    write_json(folder / "generation_config.json", generation)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    write_json(folder / "tokenizer_config.json", tokenizer_config(spec))
    write_json(folder / "special_tokens_map.json", special_tokens_map())
    return _write_weights(folder, spec)


def _make_one(spec: DemoModel, target: Path, tokenizers: Tokenizers, log: Callable[[str], None]) -> Path:
    final = target / spec.name
    if is_complete(final):
        log(f"{spec.name}: already there")
        return final
    if final.exists():
        raise FileExistsError(f"{final} exists but is not a complete model; move it away and run again")
    started = time.perf_counter()
    size = write_whole(final, lambda partial: _write_folder(partial, spec, tokenizers.get(spec.vocab_size)))
    if size is None:
        log(f"{spec.name}: already there")
        return final
    log(f"{spec.name}: made {size / 1e6:.1f} MB of weights in {time.perf_counter() - started:.1f} s")
    return final


def _select(names: Iterable[str] | None) -> list[DemoModel]:
    if names is None:
        return list(DEMO_MODELS)
    by_name = {spec.name: spec for spec in DEMO_MODELS}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"Unknown demo model(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[name] for name in dict.fromkeys(names)]


def make_demo_models(
    target: Path, names: Iterable[str] | None = None, log: Callable[[str], None] = print
) -> list[Path]:
    """Make the demo model folders under `target` (all, or those named); return their paths.

    Folders already there are kept as they are, so calling this again is cheap.
    """
    specs = _select(None if names is None else list(names))
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tokenizers = Tokenizers()
    return [_make_one(spec, target, tokenizers, log) for spec in specs]


def main(argv: list[str]) -> None:
    """`python -m tabby.demo [TARGET_DIR] [NAME ...]`: all models into ./models unless told otherwise."""
    target = Path(argv[0]) if argv else Path("models")
    make_demo_models(target, argv[1:] or None)

