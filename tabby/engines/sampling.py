"""Turning next-token logits into a token: penalties, then temperature and the filters."""

from __future__ import annotations

import torch

from tabby.engines.base import SamplingParams


def apply_penalties(logits: torch.Tensor, context: list[int], generated: list[int], params: SamplingParams) -> torch.Tensor:
    if params.repetition_penalty != 1.0 and context:
        window = context if params.penalty_range < 0 else context[-params.penalty_range :] if params.penalty_range else []
        if window:
            ids = torch.tensor(sorted(set(window)), dtype=torch.long)
            scores = logits[ids]
            # HF-style: shrink positive logits, push negative ones further down.
            logits[ids] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated:
        # OpenAI-style additive penalties, over the answer only (not the prompt).
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0])[: logits.shape[0]]
        logits -= params.frequency_penalty * counts.to(logits.dtype)
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_probs(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.top_k > 0 and params.top_k < probs.shape[0]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if params.min_p > 0:
        probs = torch.where(probs < params.min_p * probs.max(), torch.zeros_like(probs), probs)
    if 0 < params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, 0) / sorted_probs.sum()
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        drop = cumulative - sorted_probs / sorted_probs.sum() >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs


def sample_next(
    logits: torch.Tensor,
    context: list[int],
    generated: list[int],
    params: SamplingParams,
    generator: torch.Generator,
    banned: list[int],
) -> int:
    """Pick the next token from one row of logits (vocab,)."""
    logits = logits.float().clone()
    if banned:
        logits[torch.tensor(banned, dtype=torch.long)] = float("-inf")
    logits = apply_penalties(logits, context, generated, params)
    if params.temperature < 0.01:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    probs = filter_probs(probs, params)
    if float(probs.sum()) <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))
