"""What each demo model is: its shape, its config.json, its special tokens and its weights' shapes.

Everything else in a demo folder (tokenizer, weights) follows from a `DemoModel`, so the specs are
the one place that says how big each model is and which architecture it uses.
"""

from __future__ import annotations

from dataclasses import dataclass
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

BYTES_PER_PARAMETER = 4  # float32: the CPU engine computes in float32


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
    return sum(numel(shape) for shape in weight_shapes(spec).values()) * BYTES_PER_PARAMETER


def numel(shape: tuple[int, ...]) -> int:
    """How many numbers a tensor of this shape holds (the shapes come from the meta device: no tensor to ask)."""
    count = 1
    for size in shape:
        count *= size
    return count
