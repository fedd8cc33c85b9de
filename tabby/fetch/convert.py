"""Turning a GGUF file into a Hugging Face model folder: config, tokenizer, chat template, FP16 weights.

transformers reads GGUF files (through the gguf package): the config, the tokenizer and its chat
template, and the tensors, dequantized and renamed to transformers' names (with llama.cpp's Q/K
permutation undone). Only its loader is used, on a model built on the meta device to name the
tensors: loading a real model from GGUF would also need `accelerate`, and would hold the weights
twice. The weights are written as FP16, which holds the 4- and 8-bit blocks' values more closely than
BF16, and which both engines load (the torch engine in FP32, exllamav2 as an FP16 model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from tabby.fetch.download import FetchError
from tabby.folders import write_json

# llama.cpp pre-tokenizer types that cut every digit apart before the byte-level split; transformers'
# GGUF tokenizer leaves that step out, so numbers would be tokenized unlike the model was trained.
DIGIT_SPLITTING_PRE = frozenset({"smollm"})
DTYPE = torch.float16


class ConversionError(FetchError):
    """The GGUF file could not be turned into a model folder."""


def gguf_string(gguf: Path, key: str) -> str | None:
    """A string field of the GGUF file's metadata, or None."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get(key)
    return None if field is None else str(field.contents())


def read_config(gguf: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"Could not read the model's settings from {gguf.name}: {exc}") from None


def read_tokenizer(gguf: Path) -> Any:
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"Could not read the tokenizer from {gguf.name}: {exc}") from None
    if gguf_string(gguf, "tokenizer.ggml.pre") in DIGIT_SPLITTING_PRE:
        backend = tokenizer.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])
    return tokenizer


def read_tensors(gguf: Path, config: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """The model class's name and its tensors, dequantized to FP16 under transformers' names."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = list(model.state_dict())
    try:
        tensors: dict[str, torch.Tensor] = load_gguf_checkpoint(
            str(gguf), return_tensors=True, model_to_load=model, torch_dtype=DTYPE
        )["tensors"]
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ConversionError(f"Could not read the weights of {gguf.name}: {exc}") from None
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [name for name in expected if name not in tensors and not (tied and name == "lm_head.weight")]
    if missing:
        raise ConversionError(f"{gguf.name} lacks {len(missing)} of the model's tensors, e.g. {missing[0]}.")
    unused = sorted(set(tensors) - set(expected))
    if unused:
        raise ConversionError(f"{gguf.name} has tensors the model does not use, e.g. {unused[0]}.")
    overflowed = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if overflowed:
        raise ConversionError(f"The weights of {overflowed[0]} do not fit in FP16.")
    return type(model).__name__, tensors


def config_json(config: Any, architecture: str) -> dict[str, Any]:
    data: dict[str, Any] = config.to_dict()
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's title, not a path
        data.pop(key, None)
    data["architectures"] = [architecture]
    data["torch_dtype"] = data["dtype"] = str(DTYPE).removeprefix("torch.")
    rope = data.get("rope_parameters") or {}
    if "rope_theta" in rope:  # older loaders (exllamav2 among them) read it at the top level only
        data.setdefault("rope_theta", rope["rope_theta"])
    return data


def write_tokenizer(tokenizer: Any, folder: Path, max_seq_len: int) -> None:
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # where this run read it from: nothing to keep
        data.pop(key, None)
    # The class name every transformers version and exllamav2 know for a tokenizer.json tokenizer.
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data["model_max_length"] = max_seq_len
    if tokenizer.chat_template:  # also where TabbyAPI and older loaders look for it
        data["chat_template"] = tokenizer.chat_template
    write_json(path, data)
    special = {key: data[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token") if data.get(key)}
    write_json(folder / "special_tokens_map.json", special)


def generation_config(config: Any, sampling: dict[str, float]) -> dict[str, Any]:
    data: dict[str, Any] = {key: getattr(config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    data = {key: value for key, value in data.items() if value is not None}
    if sampling:
        data.update(do_sample=True, **sampling)
    return data


def convert_gguf(gguf: Path, folder: Path, sampling: dict[str, float] | None = None) -> int:
    """Write the model folder for `gguf` into `folder` (made here); return the bytes of weights written."""
    from safetensors.torch import save_file

    config = read_config(gguf)
    tokenizer = read_tokenizer(gguf)
    architecture, tensors = read_tensors(gguf, config)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config_json(config, architecture))
    write_json(folder / "generation_config.json", generation_config(config, sampling or {}))
    write_tokenizer(tokenizer, folder, int(getattr(config, "max_position_embeddings", 0) or 2048))
    weights = folder / "model.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(weights), metadata={"format": "pt"})
    # safetensors creates its files owner-only; a server running as another user must read them.
    os.chmod(weights, 0o644)
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
