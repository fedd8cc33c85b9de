"""The batched decode step on every architecture the torch engine supports, with small random models.

Each answer in a batch gets the same tokens as alone, and the logits the model's own forward pass gives.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tabby.engines.rows import decode_step, install_row_attention, prefill
from tabby.engines.torch_engine import SUPPORTED_ARCHITECTURES

SHAPE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MODEL_TYPES = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {}),
    "Qwen2ForCausalLM": ("qwen2", {}),
    "Qwen3ForCausalLM": ("qwen3", {"head_dim": 16}),
    "GemmaForCausalLM": ("gemma", {"head_dim": 16}),
    "Gemma2ForCausalLM": ("gemma2", {"head_dim": 16}),
    "Phi3ForCausalLM": ("phi3", {}),
    "GraniteForCausalLM": ("granite", {}),
    "GPT2LMHeadModel": ("gpt2", {"vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
}
PROMPTS = [list(range(3, 3 + n)) for n in (5, 9, 2, 14, 7)]
STEPS = 6


def test_every_supported_architecture_is_covered() -> None:
    assert set(MODEL_TYPES) == SUPPORTED_ARCHITECTURES


def greedy(model: Any, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of `prompts` decoded together, each prefilled alone first."""
    answers: list[tuple[list[int], Any, list[int]]] = []
    for ids in prompts:
        logits, cache = prefill(model, ids)
        answers.append(([int(logits.argmax())], cache, ids))
    for _ in range(STEPS):
        rows = decode_step(model, [t[-1] for t, _, _ in answers], [len(p) + len(t) - 1 for t, _, p in answers],
                           [cache for _, cache, _ in answers])
        for (tokens, _, _), row in zip(answers, rows):
            tokens.append(int(row.argmax()))
    return [tokens for tokens, _, _ in answers]


@pytest.mark.parametrize("architecture", sorted(MODEL_TYPES))
def test_a_batched_decode_gives_each_answer_its_tokens_alone(architecture: str) -> None:
    model_type, extra = MODEL_TYPES[architecture]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(extra if model_type == "gpt2" else {**SHAPE, **extra}))
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.inference_mode():
        ids = PROMPTS[3]
        own = model(input_ids=torch.tensor([ids + [7]])).logits[0, -1]
        install_row_attention(model)
        _, cache = prefill(model, ids)
        batched = decode_step(model, [7, 7], [len(ids), len(ids)], [cache, prefill(model, ids)[1]])
        together = greedy(model, PROMPTS)
        alone = [greedy(model, [ids])[0] for ids in PROMPTS]
    assert type(model).__name__ == architecture
    assert model.config._attn_implementation.startswith("tabby_rows_")
    # The decode step computes what the model's own forward pass computes (to float rounding)...
    assert torch.allclose(batched[0], own, atol=1e-4) and torch.equal(batched[0], batched[1])
    # ...and the very same tokens for each answer whatever decodes beside it.
    assert together == alone
    assert len({tuple(tokens) for tokens in together}) > 1
