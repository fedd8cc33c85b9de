"""Makes the demo models: real Hugging Face model folders with random weights.

The server needs models to load, list, unload and stream from without network access
and without licensed weights. These folders use real architectures (Llama, Qwen2) and a
real byte-level BPE tokenizer trained here, so every loader that reads a Hugging Face
folder treats them like any other model; only the answers are gibberish.

    python -m tabby.demo [TARGET_DIR] [NAME ...]

`specs` says what each model is, `tokenizer` trains its tokenizer, `writing` writes the folders.
"""

from __future__ import annotations

from tabby.demo.specs import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    BYTES_PER_PARAMETER,
    DEMO_MODELS,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    IM_START_TOKEN,
    IM_START_TOKEN_ID,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    DemoModel,
    weight_bytes,
    weight_shapes,
)
from tabby.demo.tokenizer import CHAT_TEMPLATE, CORPUS_MAX_CHARS
from tabby.demo.writing import MAX_SHARD_BYTES, is_complete, main, make_demo_models

__all__ = [
    "BOS_TOKEN",
    "BOS_TOKEN_ID",
    "BYTES_PER_PARAMETER",
    "CHAT_TEMPLATE",
    "CORPUS_MAX_CHARS",
    "DEMO_MODELS",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "IM_START_TOKEN",
    "IM_START_TOKEN_ID",
    "MAX_SHARD_BYTES",
    "PAD_TOKEN",
    "PAD_TOKEN_ID",
    "SPECIAL_TOKENS",
    "DemoModel",
    "is_complete",
    "main",
    "make_demo_models",
    "weight_bytes",
    "weight_shapes",
]
