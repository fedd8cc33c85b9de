"""The CPU engine: Hugging Face model folders run with PyTorch through transformers.

Weights are read module by module (one progress step per module really in memory), straight
into the memory the parameters keep: the model is built on the `meta` device (no allocation, no
random initialisation) and each module's tensors are assigned as read. Generation runs on one
worker thread with continuous batching (`tabby.engines.batch`): the answers in flight share each
decode step's forward pass, while the event loop stays free to serve HTTP.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from tabby.engines.answer import Answer
from tabby.engines.base import (
    ContextLengthError,
    GenerationChunk,
    LoadOptions,
    ModelFolderError,
    SamplingParams,
    read_model_config,
)
from tabby.engines.batch import Batch
from tabby.engines.rows import MAX_ROWS, install_row_attention
from tabby.engines.torch_options import named_template, plan_load, render_named
from tabby.engines.weights import TensorEntry, WeightReader, block_size, index_tensors
from tabby.heap import collect_all

# Decoder-only architectures whose transformers implementation this engine has been run with.
SUPPORTED_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Phi3ForCausalLM",
        "GPT2LMHeadModel",
        "GraniteForCausalLM",
    }
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
log = logging.getLogger("tabby")
_LAYER = re.compile(r"^(.*\.(?:layers|h)\.\d+)\.(.+)$")


def module_groups(names: list[str]) -> list[tuple[str, list[str]]]:
    """Group tensor names into load steps: embeddings, per layer attention and MLP, final norm, head."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            rest = match.group(2)
            part = "attn" if "attn" in rest or rest.startswith(("input_layernorm", "ln_1")) else "mlp"
            key = f"{match.group(1)}.{part}"
        else:
            key = name.rsplit(".", 1)[0]
        groups.setdefault(key, []).append(name)
    return list(groups.items())


def _assign(model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Make `tensors` the parameters (and buffers) of their names, as they are: no copy."""
    # Load through the smallest submodule holding them all: walking the whole model per module
    # would cost more than the reads of a small module.
    names = list(tensors)
    prefix = names[0].split(".")[:-1]
    for name in names[1:]:
        parts = name.split(".")
        while prefix and parts[: len(prefix)] != prefix:
            prefix.pop()
    owner = model.get_submodule(".".join(prefix)) if prefix else model
    cut = len(".".join(prefix)) + 1 if prefix else 0
    owner.load_state_dict({name[cut:]: tensor for name, tensor in tensors.items()}, strict=False, assign=True)


def _release_memory(weights: list[weakref.ref[torch.Tensor]]) -> None:
    """Hand the memory of a dropped model back. Dropping it frees its weights at once; only if something
    still holds them in a reference cycle does a full garbage collection (a pass over every Python
    object of the process, a tenth of a second or more with torch loaded) have to find it."""
    if any(ref() is not None for ref in weights):
        collect_all()
    try:  # glibc keeps freed heap pages; hand them back so unload really returns memory
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class TorchEngine:
    backend = "torch"

    def __init__(self, model_dir: Path, options: LoadOptions) -> None:
        self.model_dir = model_dir
        self.model_name = model_dir.name
        self.options = options
        self.config_json = read_model_config(model_dir)
        architecture = self.config_json["architectures"][0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelFolderError(
                f"The architecture {architecture} of {self.model_name} is not supported by the torch engine "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})."
            )
        self.tensors = index_tensors(model_dir)
        self.hf_config = self._read_hf_config()
        if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
            raise ModelFolderError(f"No tokenizer files (tokenizer.json) found in {model_dir}")
        native = int(self.config_json.get("max_position_embeddings") or 2048)
        # The load's options as this engine applies them (RoPE scaling goes into hf_config); the log says
        # which it adjusts or ignores.
        self.load = plan_load(options, native, self.hf_config)
        self.max_seq_len = self.load.max_seq_len
        self.template: Any = None  # (name, compiled) of the chat template the load named
        self.model: Any = None
        self.tokenizer: Any = None
        self.stop_token_ids: list[int] = []
        self.bos_token_id: int | None = None
        self._batch: Batch | None = None

    def _read_hf_config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.model_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFolderError(f"Failed to read config.json of {self.model_name}: {exc}") from None

    # Loading

    def load_gen(self) -> Iterator[tuple[int, int]]:
        self.template = named_template(self.model_dir, self.options.prompt_template, self.load.notes)
        for note in self.load.notes:
            log.warning("Loading %s: %s", self.model_name, note)
        entries = self.tensors
        # The files' modules in the files' order. The reads start before the model is built (it tells which
        # tensors it takes): until then they take every tensor of the files, and tensors the model does not
        # take are left out of what it is given.
        groups = module_groups(sorted(entries, key=lambda name: (entries[name].file, entries[name].start)))
        wanted: set[str] | None = None

        def modules() -> Iterator[dict[str, TensorEntry]]:
            for _, names in groups:
                if taken := [name for name in names if wanted is None or name in wanted]:
                    yield {name: entries[name] for name in taken}

        # Read with as many threads as the engine computes with (the `cpu_threads` setting), into one block
        # laid out for every tensor of the files.
        reader = WeightReader(self.options.load_throttle_mbps, threads=torch.get_num_threads(), reserve=block_size(entries))
        try:
            reading = reader.read_modules(modules())
            # The tokenizer is parsed beside the reads, once they are under way (its parser holds the interpreter
            # while it runs), and is in place before the last step makes the model ready.
            with ThreadPoolExecutor(1, thread_name_prefix="read-tokenizer") as side:
                tokenizer = side.submit(self._read_tokenizer)
                model = self._empty_model()
                wanted = set(model.state_dict())
                count = sum(1 for _, names in groups if wanted.intersection(names))
                if not count:
                    raise ModelFolderError(f"The weights of {self.model_name} hold none of the tensors its architecture takes")
                k = 0
                for module in reading:
                    # The tensors become the parameters as read (assign=True); only other dtypes are converted.
                    tensors = {name: t.to(torch.float32) for name, t in module.items() if name in wanted}
                    del module
                    if not tensors:
                        continue  # read before the model was built, and none of it is the model's
                    k += 1
                    if tokenizer.done():
                        tokenizer.result()  # an unreadable tokenizer fails the load now, not after the reads
                    _assign(model, tensors)
                    del tensors
                    if k == count:  # the last step also makes the model ready to answer
                        self.tokenizer = tokenizer.result()
                        self._finish_model(model)
                    yield k, count
        finally:
            reader.close()

    def _empty_model(self) -> Any:
        """The model with its parameters on the `meta` device: no memory, no random initialisation of
        weights about to be read."""
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        with torch.device("meta"), no_init_weights():
            return AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)

    def _read_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.model_dir)
        except Exception as exc:  # noqa: BLE001  the tokenizers library raises a bare Exception for a malformed file
            raise ModelFolderError(f"Failed to read the tokenizer of {self.model_name}: {exc}") from None

    def _finish_model(self, model: Any) -> None:
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        for name, module in list(model.named_modules()):
            if any(buf.is_meta for buf in module.buffers(recurse=False)) and type(module).__name__.endswith("RotaryEmbedding"):
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                setattr(parent, name.rsplit(".", 1)[-1], type(module)(model.config))
        missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
        if missing:
            raise ModelFolderError(f"The weights of {self.model_name} lack {len(missing)} tensors, e.g. {missing[0]}")
        model.eval()
        self.model = model
        self.stop_token_ids = self._eos_ids()
        self.bos_token_id = self.tokenizer.bos_token_id
        install_row_attention(model)
        self._batch = Batch(model, self.stop_token_ids, self._answer_text, self.model_name)

    def _eos_ids(self) -> list[int]:
        """The union of config.json's, generation_config.json's and the tokenizer's EOS ids."""
        ids: set[int] = set()
        sources: list[Any] = [self.config_json.get("eos_token_id"), self.tokenizer.eos_token_id]
        generation_config = self.model_dir / "generation_config.json"
        if generation_config.exists():
            sources.append(json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id"))
        for value in sources:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return sorted(ids)

    # Tokens and templates

    def encode(self, text: str, add_bos: bool = True, encode_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not encode_special_tokens)
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], decode_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=not decode_special_tokens))

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, template_vars: dict[str, Any] | None = None
    ) -> str:
        if self.template is not None:
            text = render_named(self.template[1], self.tokenizer, messages, add_generation_prompt, template_vars)
        elif not getattr(self.tokenizer, "chat_template", None):
            raise ModelFolderError(f"{self.model_name} has no chat template; use /v1/completions instead.")
        else:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_vars or {})
            )
        bos = self.tokenizer.bos_token
        # The prompt gets its BOS from encode(); a template that writes one too would double it.
        return str(text[len(bos) :] if bos and text.startswith(bos) else text)

    def card_parameters(self) -> dict[str, Any]:
        return {
            "max_seq_len": self.max_seq_len,
            "cache_size": self.load.cache_size,
            "cache_mode": "FP32",
            "rope_scale": self.load.rope_scale,
            "rope_alpha": self.load.rope_alpha,
            "max_batch_size": MAX_ROWS,
            "chunk_size": self.max_seq_len,
            "prompt_template": self._template_name(),
            "prompt_template_content": None,
            "use_vision": False,
            "draft": None,
        }

    def _template_name(self) -> str | None:
        if self.template is not None:
            return str(self.template[0])
        return "tokenizer_config" if getattr(self.tokenizer, "chat_template", None) else None

    # Generation

    def _answer_text(self, ids: list[int]) -> str:
        return self.decode(ids, decode_special_tokens=False)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextLengthError(len(prompt_ids), self.max_seq_len)
        params.max_tokens = min(params.max_tokens, self.max_seq_len - len(prompt_ids))
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        answer = Answer(prompt_ids, params, asyncio.get_running_loop(), asyncio.Queue(), generator)
        batch = self._batch
        if batch is None:
            raise RuntimeError("The model was unloaded.")
        batch.submit(answer)  # raises too if the unload came first
        try:
            while True:
                item = await answer.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            answer.cancelled = True  # the batch drops it before its next step

    # Unloading

    def unload(self) -> None:
        if self._batch is not None:
            self._batch.stop()
            self._batch = None
        weights = [weakref.ref(tensor) for tensor in self.model.parameters()] if self.model is not None else []
        self.model = None
        self.tokenizer = None
        _release_memory(weights)
