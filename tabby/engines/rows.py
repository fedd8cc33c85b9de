"""Forward passes over many answers at once, each answer attending over its own KV cache.

A decode step feeds the last token of every answer in flight as one batch: the projections and the
MLP (nearly all of a step's work) run once for all rows. Attention runs row by row over each
answer's own cache, exactly as for an answer alone: nothing is padded, no mask is needed, and an
answer joins or leaves a batch without touching any other answer's cache.

Greedy answers are the same in any company. A CPU matrix product gives, for one input row,
sums in another order than for several rows (another kernel); from four rows on it gives every
row the same bits whatever the count and the other rows hold. So each decode step computes at
least `MIN_ROWS` rows, filling up with idle rows when fewer answers run, and an answer alone gets
the very numbers it gets in a crowd. The output head, the widest product, runs row by row (one row
is one kernel too), for the answers only.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# The row count from which the CPU matrix kernels give each row the same sums whatever the count
# (measured for the projection shapes of the supported architectures, 4 to 64 rows, 1 and 2 threads).
MIN_ROWS = 4
# The most answers one decode step carries; more wait for a place.
MAX_ROWS = 32
_FILLER_TOKEN = 0
_PREFIX = "tabby_rows_"


@dataclass
class StepRows:
    """The caches of the answers a decode step carries, in row order (filler rows have none)."""

    caches: list[Any]


def install_row_attention(model: Any) -> None:
    """Route the model's attention through the row-by-row attention (prefills still use the model's own),
    and give its output head one row at a time."""
    _head_by_row(model.get_output_embeddings())
    base = model.config._attn_implementation or "eager"
    if base.startswith(_PREFIX):
        return
    name = _PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _row_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)


def _head_by_row(head: torch.nn.Module) -> None:
    """The head (vocabulary-wide: the largest product of a step) computes each answer's row alone, the
    same product as for an answer alone, its weights still in the CPU's cache for the next row; filler
    rows get none. The new forward holds the head weakly: a head referring to itself would be freed
    (with the weights beside its own) only by a full garbage collection, not when the model is dropped."""
    whole = type(head).forward
    ref = weakref.ref(head)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        module = ref()
        assert module is not None  # called through the head, so the head is there
        live = getattr(module, "live_rows", None) or hidden.shape[0]
        if hidden.shape[0] == 1:
            return whole(module, hidden)  # type: ignore[no-any-return]
        return torch.cat([whole(module, hidden[i : i + 1]) for i in range(live)])

    head.forward = forward  # type: ignore[method-assign]


def _base_function(base: str, module: torch.nn.Module) -> Callable[..., Any]:
    if base != "eager" and base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]  # type: ignore[no-any-return]
    # Eager attention is each architecture's own function (softcapping and the like), beside its module.
    return sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[no-any-return]


def _row_attention(base: str) -> Callable[..., tuple[torch.Tensor, None]]:
    def attention(
        module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any
    ) -> Any:
        rows: StepRows | None = kwargs.pop("step_rows", None)
        function = _base_function(base, module)
        if rows is None:  # a prefill: one answer, the model's own attention and mask
            return function(module, query, key, value, mask, **kwargs)
        window = kwargs.get("sliding_window")
        # (batch, query length, heads, head size), as the attention functions return it; filler rows stay 0.
        out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        for i, cache in enumerate(rows.caches):
            keys, values = cache.update(key[i : i + 1], value[i : i + 1], module.layer_idx)
            if window and keys.shape[2] > window:
                keys, values = keys[:, :, -window:], values[:, :, -window:]
            out[i : i + 1] = function(module, query[i : i + 1], keys, values, None, **kwargs)[0]
        return out, None

    return attention


def prefill(model: Any, prompt_ids: list[int]) -> tuple[torch.Tensor, Any]:
    """One answer's prompt through the model: the logits of its first token and its new KV cache."""
    out = model(input_ids=torch.tensor([prompt_ids], dtype=torch.long), use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], out.past_key_values


def decode_step(model: Any, tokens: list[int], positions: list[int], caches: list[Any]) -> torch.Tensor:
    """Next-token logits (one row per answer) for `tokens` fed at `positions`, each over its cache (grown by one)."""
    width = max(len(tokens), MIN_ROWS)
    filler = width - len(tokens)
    ids = torch.tensor(tokens + [_FILLER_TOKEN] * filler, dtype=torch.long).view(width, 1)
    where = torch.tensor(positions + [0] * filler, dtype=torch.long).view(width, 1)
    head = model.get_output_embeddings()
    head.live_rows = len(tokens)
    try:
        out = model(input_ids=ids, position_ids=where, use_cache=False, logits_to_keep=1, step_rows=StepRows(caches))
    finally:
        head.live_rows = None
    return out.logits[:, -1]
