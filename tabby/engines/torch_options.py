"""What the torch (CPU) engine makes of a load's options: those it applies, and a sentence for each one it
adjusts or ignores, logged as TabbyAPI logs its own (a load that asks for what an engine cannot do still
loads, as in TabbyAPI, and the server's log says so).

Applied: `max_seq_len` (at most the model's own unless RoPE scaling stretches the positions), `cache_size`
(rounded up to 256 tokens as TabbyAPI does; it caps the context, each answer having its own cache),
`rope_scale` (linear position scaling) and `rope_alpha` (NTK: the RoPE base grows by
alpha^(d/(d-2)), as exllamav2 computes it) on models with rotary embeddings, and `prompt_template`
(looked up as TabbyAPI does: a named template file, a named template of tokenizer_config.json).
Ignored, said so: `cache_mode` (the cache is float32), `chunk_size` (a prompt is read in one pass),
`gpu_split_auto`, `gpu_split` and `autosplit_reserve` (no GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from tabby.engines.base import LoadOptions
from tabby.templating import compile_chat_template, find_chat_template, render_chat_template

PAGE = 256


@dataclass
class TorchLoad:
    """The load as the torch engine runs it (its model card shows these)."""

    max_seq_len: int
    cache_size: int
    rope_scale: float = 1.0
    rope_alpha: float = 1.0
    notes: list[str] = field(default_factory=list)


def plan_load(options: LoadOptions, native: int, hf_config: Any) -> TorchLoad:
    """The load `options` ask for, on a model of context `native` whose transformers config is `hf_config`
    (its RoPE settings are changed here, before the model is built from it)."""
    notes = _ignored(options)
    scale, alpha = _apply_rope(options, hf_config, notes)
    stretched = scale > 1 or alpha > 1
    max_seq_len = options.max_seq_len or native
    if max_seq_len > native and not stretched:
        notes.append(
            f"The given max_seq_len ({max_seq_len}) is larger than the model's own ({native}) and will be limited to "
            f"{native} tokens; set rope_scale or rope_alpha to stretch the positions."
        )
        max_seq_len = native
    cache_size = max_seq_len
    if options.cache_size:
        cache_size = math.ceil(options.cache_size / PAGE) * PAGE
        if cache_size != options.cache_size:
            notes.append(f"The given cache_size ({options.cache_size}) is not a multiple of {PAGE}; using {cache_size} tokens.")
        if max_seq_len > cache_size:
            notes.append(
                f"The given max_seq_len ({max_seq_len}) is larger than the cache size and will be limited to {cache_size} tokens."
            )
            max_seq_len = cache_size
    return TorchLoad(max_seq_len, cache_size, scale, alpha, notes)


def _ignored(options: LoadOptions) -> list[str]:
    notes = []
    if options.cache_mode and options.cache_mode.upper() not in ("FP32", "FP16"):
        notes.append(f"cache_mode {options.cache_mode} is ignored: the torch engine keeps its cache in float32.")
    if options.chunk_size:
        notes.append(f"chunk_size {options.chunk_size} is ignored: the torch engine reads a prompt in one pass.")
    for name in ("gpu_split_auto", "gpu_split", "autosplit_reserve"):
        if getattr(options, name) is not None:
            notes.append(f"{name} is ignored: the torch engine runs on the CPU.")
    return notes


def _apply_rope(options: LoadOptions, hf_config: Any, notes: list[str]) -> tuple[float, float]:
    """(rope_scale, rope_alpha) as applied to `hf_config`; 1.0 for what was not asked or cannot apply."""
    scale, alpha = options.rope_scale or 1.0, options.rope_alpha or 1.0
    rope = getattr(hf_config, "rope_parameters", None)
    if scale == 1.0 and alpha == 1.0:
        return 1.0, 1.0
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        notes.append("rope_scale and rope_alpha are ignored: this model has no rotary position embeddings.")
        return 1.0, 1.0
    rope = dict(rope)
    if scale != 1.0 and rope.get("rope_type", "default") != "default":
        notes.append(f"rope_scale is ignored: the model already scales its positions ({rope.get('rope_type')}).")
        scale = 1.0
    elif scale != 1.0:
        rope.update(rope_type="linear", factor=scale)
    if alpha != 1.0:
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        rope["rope_theta"] = float(rope["rope_theta"]) * alpha ** (head_dim / (head_dim - 2))
    hf_config.rope_parameters = rope
    return scale, alpha


def named_template(model_dir: Path, name: str | None, notes: list[str]) -> tuple[str, jinja2.Template] | None:
    """The chat template a load names (`prompt_template`), compiled, with its name; None when none was
    named (the tokenizer's own applies), or when it was not found (said in `notes`)."""
    if not name:
        return None
    found = find_chat_template(model_dir, name)
    if found is None or found.name not in (name, name.removesuffix(".jinja")):
        notes.append(
            f"prompt_template {name} was not found (no templates/{name}.jinja, no template of that name in "
            "tokenizer_config.json); the model's own template is used."
        )
        return None
    return found.name, compile_chat_template(found)


def render_named(
    template: jinja2.Template,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    template_vars: dict[str, Any] | None,
) -> str:
    tokens = {name: str(getattr(tokenizer, name, None) or "") for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return render_chat_template(template, messages, add_generation_prompt, tokens, template_vars)
