"""The small interface every engine implements.

An engine owns one loaded model: its weights, tokenizer and generator. The server
(`tabby.manager`) serialises loads and tracks running generations, `tabby.routes` speaks
HTTP; an engine only loads, tokenizes, generates and unloads.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class ModelFolderError(ValueError):
    """The model folder cannot be loaded (missing or malformed files, unknown architecture)."""


class EngineUnavailableError(RuntimeError):
    """The selected engine cannot run on this machine (e.g. exllamav2 without CUDA)."""


class ContextLengthError(ValueError):
    """The prompt (plus the requested tokens) does not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_seq_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_seq_len = max_seq_len
        super().__init__(
            f"This model's maximum context length is {max_seq_len} tokens. However, your "
            f"request has {prompt_tokens} prompt tokens. Please shorten the messages."
        )


@dataclass
class LoadOptions:
    """What a load request may set; None means the model's own default."""

    max_seq_len: int | None = None
    cache_size: int | None = None
    cache_mode: str | None = None
    chunk_size: int | None = None
    rope_scale: float | None = None
    rope_alpha: float | None = None
    prompt_template: str | None = None
    gpu_split_auto: bool | None = None
    gpu_split: list[float] | None = None
    autosplit_reserve: list[float] | None = None
    # Simulated disk speed in MB/s (0 = no throttle): holds a load open for a known time.
    load_throttle_mbps: float = 0.0


@dataclass
class SamplingParams:
    """OpenAI/TabbyAPI sampling settings, already defaulted (neutral where unset)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_range: int = -1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ban_eos_token: bool = False
    seed: int | None = None
    min_tokens: int = 0


@dataclass
class GenerationChunk:
    """A piece of streamed text; the last one has `finish_reason` set."""

    text: str
    token_count: int = 0  # tokens generated so far, this chunk included
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    stop_str: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(Protocol):
    """One loaded (or loading) model."""

    model_name: str
    model_dir: Path
    max_seq_len: int

    def load_gen(self) -> Iterator[tuple[int, int]]:
        """Load the weights; yield (k, n) after module k of n is really in memory. Blocking."""
        ...

    def encode(self, text: str, add_bos: bool = True, encode_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], decode_special_tokens: bool = True) -> str: ...

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, template_vars: dict[str, Any] | None = None
    ) -> str:
        """Apply the model's chat template."""
        ...

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Stream the answer. Closing the iterator (aclose / cancellation) stops the generation."""
        ...

    def card_parameters(self) -> dict[str, Any]:
        """The `parameters` of the model card (max_seq_len, cache_size, cache_mode, prompt_template, ...)."""
        ...

    def unload(self) -> None:
        """Give the memory back. Blocking."""
        ...


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """Read and sanity-check `config.json`; raise ModelFolderError with a sentence a person understands."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"Failed to load config.json from {model_dir}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"Failed to load config.json from {model_dir}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"Failed to load config.json from {model_dir}: not a JSON object")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1 or not isinstance(architectures[0], str):
        raise ModelFolderError(f"{model_dir}/config.json must name exactly one architecture in 'architectures'")
    return config


# Sampling fields of a model's generation_config.json that stand in for those a request leaves unset, as
# vLLM does: the model's authors know what it answers well with (a small model rambles at temperature 1).
GENERATION_CONFIG_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def read_sampling_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling settings of the model's generation_config.json; {} when it has none (or says not to sample)."""
    try:
        config = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(config, dict) or config.get("do_sample") is False:
        return {}
    return {
        key: float(value)
        for key in GENERATION_CONFIG_SAMPLING
        if isinstance(value := config.get(key), (int, float)) and not isinstance(value, bool)
    }
