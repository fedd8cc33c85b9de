"""What the GPU engine checks and decides before exllamav2 is imported, and the one door to it.

Folder and option checks run on any machine; `import_exllamav2()` turns every way the import can
fail without CUDA (ImportError, OSError, RuntimeError) into a sentence a person can act on.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tabby.engines.base import EngineUnavailableError, ModelFolderError, read_model_config

# What exllamav2 0.3.2's architecture.py knows. Anything else loads *as Llama* with only a printed
# warning (and then produces garbage), so unknown names are refused here instead.
SUPPORTED_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "YiForCausalLM",
    "OrionForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForConditionalGeneration", "GemmoeForCausalLM",
    "Starcoder2ForCausalLM", "CohereForCausalLM", "Cohere2ForCausalLM", "DbrxForCausalLM",
    "Phi3ForCausalLM", "GPTBigCodeForCausalLM", "GPT2LMHeadModel", "MiniCPMForCausalLM",
    "InternLM2ForCausalLM", "IndexForCausalLM", "GraniteForCausalLM", "Glm4ForCausalLM",
})
# Recognised only with a Pixtral vision tower; otherwise they too fall back to Llama.
PIXTRAL_ARCHITECTURES = frozenset({"LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration"})
UNSUPPORTED_QUANT_METHODS = {"exl3": "exllamav3", "awq": "another backend", "fp8": "another backend"}

CACHE_CLASSES = {
    "FP16": "ExLlamaV2Cache", "Q8": "ExLlamaV2Cache_Q8", "Q6": "ExLlamaV2Cache_Q6", "Q4": "ExLlamaV2Cache_Q4",
}
PAGE_SIZE = 256  # the dynamic generator's page; the cache must hold whole pages even unpaged
DEFAULT_CHUNK_SIZE = 2048
DEFAULT_RESERVE_MB = 96.0
# The cache is allocated whole at load: a model's native context (131k tokens for Llama 3.1) would
# take 16 GiB, so without a max_seq_len or cache_size the context is capped here, as TabbyAPI does.
DEFAULT_MAX_SEQ_LEN = 4096
EXTENSION = "exllamav2_ext"  # the compiled module exllamav2 imports, or else compiles on the spot
MAX_Q_SIZE = 8  # the dynamic generator's default max_q_size
MIN_FLASH_ATTN = (2, 5, 7)
LOOP_TIMEOUT_S = 60.0



@dataclass(frozen=True)
class ExLlamaV2Modules:
    """The imported library: `core` is `exllamav2`, `generator` is `exllamav2.generator`."""

    core: ModuleType
    generator: ModuleType


def import_exllamav2() -> ExLlamaV2Modules:
    """Import exllamav2, or raise EngineUnavailableError with what to do instead."""
    try:
        import torch
    except ImportError as exc:
        raise EngineUnavailableError(
            f"The exllamav2 backend needs PyTorch with CUDA, and PyTorch cannot be imported here: {exc}"
        ) from None
    if not torch.cuda.is_available():
        raise EngineUnavailableError(
            "The exllamav2 backend needs an NVIDIA GPU with CUDA, and none is available on this machine. "
            "Use backend 'torch' (or 'auto') instead."
        )
    if importlib.util.find_spec("exllamav2") is None:
        raise EngineUnavailableError(
            "The exllamav2 backend is not available: exllamav2 is not installed. Install Gantry's 'gpu' "
            "extra on this GPU machine, or use backend 'torch' (or 'auto') instead."
        )
    if importlib.util.find_spec(EXTENSION) is None:
        # Without it, importing exllamav2 compiles it with nvcc: minutes inside this load, which then
        # looks stuck (and fails without a CUDA toolkit). It is built once, ahead of any load.
        raise EngineUnavailableError(
            f"exllamav2 is installed without its compiled CUDA extension ({EXTENSION}), so loading would "
            "first compile it, for minutes. Build it once ahead of time (the GPU image does; see the README, "
            "'GPU install'), or install an exllamav2 wheel built for this torch and CUDA."
        )
    threads = torch.get_num_threads()
    try:
        return ExLlamaV2Modules(importlib.import_module("exllamav2"), importlib.import_module("exllamav2.generator"))
    except (ImportError, OSError, RuntimeError, NameError) as exc:
        # NameError: exllamav2 swallows an extension that fails to load (other than "undefined symbol")
        # and then trips over the name it never bound.
        raise EngineUnavailableError(
            f"exllamav2 is installed but its CUDA extension could not be loaded ({type(exc).__name__}: {exc}). "
            "It needs an extension built for this torch and CUDA (see the README, 'GPU install'). "
            "Fix the GPU install or use backend 'torch' (or 'auto') instead."
        ) from exc
    finally:
        # Importing exllamav2.model sets torch to one CPU thread for the whole process.
        torch.set_num_threads(threads)


def check_model_folder(model_dir: Path) -> dict[str, Any]:
    """config.json, when the folder is something exllamav2 0.3.2 really loads; else ModelFolderError."""
    config = read_model_config(model_dir)
    _check_architecture(model_dir, config)
    quant_method = str(_section(config, "quantization_config").get("quant_method", "")).lower()
    if quant_method in UNSUPPORTED_QUANT_METHODS:
        raise ModelFolderError(
            f"{model_dir.name} is a {quant_method.upper()} model, which exllamav2 cannot load; "
            f"use {UNSUPPORTED_QUANT_METHODS[quant_method]}."
        )
    if not any(model_dir.glob("*.safetensors")):
        raise ModelFolderError(f"{model_dir.name} has no *.safetensors weights; exllamav2 loads only safetensors.")
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelFolderError(
            f"{model_dir.name} has no tokenizer.json; exllamav2 0.3 needs it "
            "(SentencePiece-only models no longer load)."
        )
    return config


def _check_architecture(model_dir: Path, config: dict[str, Any]) -> None:
    architecture = config["architectures"][0]
    vision_type = _section(config, "vision_config").get("model_type")
    if architecture in SUPPORTED_ARCHITECTURES or (architecture in PIXTRAL_ARCHITECTURES and vision_type == "pixtral"):
        return
    raise ModelFolderError(
        f"The exllamav2 backend does not support the architecture {architecture} of {model_dir.name} "
        "(it would load it as Llama and produce garbage). Use backend 'torch' for this model."
    )


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def check_cache_mode(cache_mode: str | None) -> str:
    mode = (cache_mode or "FP16").upper()
    if mode in {"8BIT", "FP8"}:
        raise ValueError(
            "Cache mode 8bit (FP8) does not work with exllamav2's dynamic generator; use FP16, Q8, Q6 or Q4."
        )
    if mode not in CACHE_CLASSES:
        raise ValueError(f"Unknown cache mode {cache_mode!r}; use FP16, Q8, Q6 or Q4.")
    return mode


def round_up_to_page(tokens: int) -> int:
    return max(PAGE_SIZE, math.ceil(tokens / PAGE_SIZE) * PAGE_SIZE)


def native_max_seq_len(config: dict[str, Any]) -> int:
    """The context length exllamav2's prepare() will read, looked up the same way."""
    keys = ("max_sequence_length", "model_max_length", "max_position_embeddings", "max_seq_len", "n_positions")
    for source in (config, _section(config, "text_config")):
        for key in keys:
            if isinstance(source.get(key), int):
                return int(source[key])
    return 2048


def eos_token_ids(config: dict[str, Any], generation_config: dict[str, Any] | None, fallback: int | None) -> list[int]:
    """The union of config.json and generation_config.json EOS ids (exllamav2 keeps only the first)."""
    ids: list[int] = []
    for source in (config, generation_config or {}):
        value = source.get("eos_token_id")
        ids += [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    if not ids and fallback is not None:
        ids = [fallback]
    return list(dict.fromkeys(ids))


def cache_tokens(max_seq_len: int | None, cache_size: int | None, native: int) -> int:
    """The cache in whole pages: as asked, else the context asked for, else the model's own capped at 4096."""
    return round_up_to_page(cache_size or max_seq_len or min(native, DEFAULT_MAX_SEQ_LEN))


def autosplit_reserve_bytes(reserve_mb: list[float] | None, gpus: int) -> list[int]:
    """Bytes to leave free on each GPU; autosplit reads one entry per GPU it reaches (TabbyAPI pads with 0)."""
    reserve = [math.ceil(mb * 1024**2) for mb in reserve_mb or [DEFAULT_RESERVE_MB]]
    return (reserve + [0] * gpus)[: max(gpus, 1)]


def gpus_in_use(gpu_split_auto: bool, gpu_split: list[float] | None) -> list[int]:
    """The devices a load will put layers on: every GPU for autosplit, else those given memory (GPU 0 by default)."""
    import torch

    if gpu_split_auto:
        return list(range(torch.cuda.device_count()))
    return [i for i, gib in enumerate(gpu_split or []) if gib > 0] or [0]


def flash_attn_hardware(devices: list[int]) -> bool:
    """Every GPU in use can run flash-attn 2: NVIDIA, compute capability 8 (Ampere) or more."""
    import torch

    if getattr(torch.version, "hip", None):
        return False
    return all(torch.cuda.get_device_capability(i)[0] >= 8 for i in devices)


def flash_attn_supports_paging(devices: list[int]) -> bool:
    """flash-attn >= 2.5.7 importable and every GPU in use of compute capability 8 or more."""
    try:
        import flash_attn
    except (ImportError, OSError, RuntimeError):
        return False
    numbers = re.findall(r"\d+", str(getattr(flash_attn, "__version__", "0")))[:3]
    if tuple(int(n) for n in numbers) < MIN_FLASH_ATTN:
        return False
    return flash_attn_hardware(devices)
