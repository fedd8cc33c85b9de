"""The demo models' tokenizer: byte-level BPE trained here on prose every Python install carries.

Training needs no network and no data set: the standard library's docstrings and comments are
English enough for a vocabulary of a few thousand tokens, and training takes about a second.
"""

from __future__ import annotations

import ast
import builtins
import gc
import os
import sysconfig
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from tabby.demo.specs import BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, DemoModel

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

CORPUS_MAX_CHARS = 1_000_000  # enough text for an 8k vocab; keeps training near a second
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


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
        tree = _parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return []
    return [*_docstrings(tree), *_comment_blocks(source)]


def _parse(source: str) -> ast.Module:
    # CPython 3.11 miscounts the AST builder's recursion depth when a garbage collection runs finalizers
    # in the middle of a parse ("SystemError: AST constructor recursion depth mismatch"), as it can in a
    # long-lived process full of other work: no collection while a file is parsed.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


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


def tokenizer_config(spec: DemoModel) -> dict[str, Any]:
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


def special_tokens_map() -> dict[str, Any]:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, EOS_TOKEN],
    }


class Tokenizers:
    """Trains each distinct vocabulary size once, and only if some model needs it."""

    def __init__(self) -> None:
        self._trained: dict[int, str] = {}

    def get(self, vocab_size: int) -> str:
        if vocab_size not in self._trained:
            self._trained[vocab_size] = _train_tokenizer(_training_corpus(), vocab_size)
        return self._trained[vocab_size]
