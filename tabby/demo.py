"""Makes the demo models: real Hugging Face model folders with random weights.

The server needs models to load, list, unload and stream from without network access
and without licensed weights. These folders use real architectures (Llama, Qwen2) and a
real byte-level BPE tokenizer trained here, so every loader that reads a Hugging Face
folder treats them like any other model; only the answers are gibberish.

    python -m tabby.demo [TARGET_DIR] [NAME ...]
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import shutil
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

BOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = BOS_TOKEN
# Listed in id order: training puts special tokens first, so these ids are fixed.
SPECIAL_TOKENS = (BOS_TOKEN, IM_START_TOKEN, EOS_TOKEN)
BOS_TOKEN_ID, IM_START_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
PAD_TOKEN_ID = BOS_TOKEN_ID

# ChatML. Content may also be a list of OpenAI-style parts; only the text parts count.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- elif message['content'] is iterable -%}"
    "{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- else -%}"
    "{%- set content = '' -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

BYTES_PER_PARAMETER = 4  # float32: the CPU engine computes in float32
MAX_SHARD_BYTES = 512 * 10**6
CORPUS_MAX_CHARS = 1_000_000  # enough text for an 8k vocab; keeps training near a second
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class DemoModel:
    """The shape of one demo model; everything else in its folder follows from it."""

    name: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def config(self) -> dict[str, Any]:
        """The contents of `config.json`."""
        config: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers 5 reads rope_parameters, older readers rope_theta.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "pad_token_id": PAD_TOKEN_ID,
            "torch_dtype": "float32",
            "dtype": "float32",
        }
        return config | _architecture_extras(self)


def _architecture_extras(spec: DemoModel) -> dict[str, Any]:
    # Qwen2 always has q/k/v biases; Llama has none unless attention_bias says so.
    if spec.model_type == "qwen2":
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": spec.num_hidden_layers}
    return {"attention_bias": False, "mlp_bias": False}


DEMO_MODELS: tuple[DemoModel, ...] = (
    DemoModel(
        name="Tiny-Chat-5M",
        architecture="LlamaForCausalLM",
        model_type="llama",
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        seed=1,
    ),
    DemoModel(
        name="Small-Chat-200M",
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=14,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        seed=2,
    ),
    DemoModel(
        name="Large-Chat-1G",
        architecture="LlamaForCausalLM",
        model_type="llama",
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        seed=3,
    ),
)


# --- weights -----------------------------------------------------------------------


def weight_shapes(spec: DemoModel) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes exactly as transformers expects them, in state-dict order.

    The model is built on the meta device, so this costs no memory for the weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = spec.config()
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # state_dict() already leaves out non-persistent buffers such as rotary inv_freq.
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def weight_bytes(spec: DemoModel) -> int:
    """Size of the weights on disk, computed from the shapes alone."""
    return sum(_numel(shape) for shape in weight_shapes(spec).values()) * BYTES_PER_PARAMETER


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


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
        size = _numel(shape) * BYTES_PER_PARAMETER
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
    total = sum(_numel(shape) for shape in shapes.values()) * BYTES_PER_PARAMETER
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, names in zip(file_names, shards) for name in names}
        _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


# --- tokenizer ---------------------------------------------------------------------


def _stdlib_sources() -> Iterator[Path]:
    """The standard library's own .py files, in a fixed order, tests and third-party code left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_STDLIB_DIRS]
        found.extend(Path(folder) / name for name in files if name.endswith(".py"))
    yield from sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _docstrings(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                yield docstring


def _comment_blocks(source: str) -> Iterator[str]:
    # Consecutive comment lines form one sentence or paragraph; keep them together.
    block: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            text = stripped.lstrip("#").strip()
            if text:
                block.append(text)
                continue
        if block:
            yield " ".join(block)
            block = []
    if block:
        yield " ".join(block)


def _file_texts(path: Path) -> list[str]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return []
    return [*_docstrings(tree), *_comment_blocks(source)]


@lru_cache(maxsize=1)  # reading the sources is the slow part of training; it never changes
def _training_corpus(max_chars: int = CORPUS_MAX_CHARS) -> tuple[str, ...]:
    """English-ish prose that every Python install carries: stdlib docstrings and comments."""
    corpus: list[str] = []
    total = 0
    for path in _stdlib_sources():
        for text in _file_texts(path):
            corpus.append(text[: max_chars - total])
            total += len(corpus[-1])
            if total >= max_chars:
                return tuple(corpus)
    # Installs without stdlib sources still have the builtins' docstrings.
    corpus.extend(doc for _, obj in sorted(vars(builtins).items()) if isinstance(doc := getattr(obj, "__doc__", None), str))
    return tuple(corpus)


def _train_tokenizer(corpus: Iterable[str], vocab_size: int) -> str:
    """A byte-level BPE tokenizer (any UTF-8 round-trips) as tokenizer.json text."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    # Special so they are matched before pre-tokenization: "<|im_start|>" stays one token.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer.to_str(pretty=True)


def _tokenizer_config(spec: DemoModel) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START_TOKEN, EOS_TOKEN],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(token_id): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token_id, token in enumerate(SPECIAL_TOKENS)
        },
    }


def _special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, EOS_TOKEN],
    }


class _Tokenizers:
    """Trains each distinct vocabulary size once, and only if some model needs it."""

    def __init__(self) -> None:
        self._trained: dict[int, str] = {}

    def get(self, vocab_size: int) -> str:
        if vocab_size not in self._trained:
            self._trained[vocab_size] = _train_tokenizer(_training_corpus(), vocab_size)
        return self._trained[vocab_size]


# --- folders -----------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _weight_files(folder: Path) -> list[Path] | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a whole model (config, tokenizer and every weight file)."""
    needed = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    if not all((folder / name).is_file() for name in needed):
        return False
    weight_files = _weight_files(folder)
    return weight_files is not None and all(path.is_file() for path in weight_files)


def _partial_folder(target: Path, name: str) -> Path:
    # Hidden, and named after the writing process so a later run can tell a dead one's leftovers.
    return target / f".{name}.partial-{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(target: Path, name: str) -> None:
    for leftover in target.glob(f".{name}.partial-*"):
        pid_text = leftover.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and (int(pid_text) == os.getpid() or not _process_alive(int(pid_text))):
            shutil.rmtree(leftover, ignore_errors=True)


def _write_folder(folder: Path, spec: DemoModel, tokenizer_json: str) -> int:
    folder.mkdir()
    _write_json(folder / "config.json", spec.config())
    generation = {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID}
    _write_json(folder / "generation_config.json", generation)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(spec))
    _write_json(folder / "special_tokens_map.json", _special_tokens_map())
    return _write_weights(folder, spec)


def _make_one(spec: DemoModel, target: Path, tokenizers: _Tokenizers, log: Callable[[str], None]) -> Path:
    final = target / spec.name
    if is_complete(final):
        log(f"{spec.name}: already there")
        return final
    if final.exists():
        raise FileExistsError(f"{final} exists but is not a complete model; move it away and run again")
    started = time.perf_counter()
    _remove_stale_partials(target, spec.name)
    partial = _partial_folder(target, spec.name)
    try:
        size = _write_folder(partial, spec, tokenizers.get(spec.vocab_size))
        # The rename is what makes the model visible: an interrupted run leaves only the hidden partial.
        os.rename(partial, final)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if is_complete(final):  # another run finished it first
            log(f"{spec.name}: already there")
            return final
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
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
    tokenizers = _Tokenizers()
    return [_make_one(spec, target, tokenizers, log) for spec in specs]


def main(argv: list[str]) -> None:
    target = Path(argv[0]) if argv else Path("models")
    make_demo_models(target, argv[1:] or None)


if __name__ == "__main__":
    main(sys.argv[1:])
