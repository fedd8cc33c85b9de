"""The GPU engine's dealings with exllamav2's generator: sampler settings, results and cancelling jobs.

Like `exllamav2_support`, this imports neither exllamav2 nor torch: the library arrives as an
argument (the module `import_exllamav2()` returned) or as the generator and jobs it made, so the
engine still opens the only door to it, and only when a load starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any

from tabby.engines.base import GenerationChunk, SamplingParams
from tabby.engines.exllamav2_support import LOOP_TIMEOUT_S


class GenerationAbortedError(RuntimeError):
    """The model was unloaded while an answer was still being generated."""

    def __init__(self) -> None:
        super().__init__("The model was unloaded while this answer was being generated.")


# Sampling and results


def sampler_settings(generator_module: ModuleType, params: SamplingParams, tokenizer: Any, banned: list[int]) -> Any:
    """Every field set (the library's defaults are not neutral: temperature 0.8, top_k 50, ...), `banned` never sampled."""
    greedy = params.temperature < 0.01
    settings = generator_module.ExLlamaV2Sampler.Settings(
        temperature=1.0 if greedy else params.temperature,
        top_k=1 if greedy else max(params.top_k, 0),
        top_p=0.0 if greedy else params.top_p,
        min_p=0.0 if greedy else params.min_p,
        top_a=0.0, tfs=0.0, typical=0.0, skew=0.0, smoothing_factor=0.0, temperature_last=False,
        min_temp=0.0, max_temp=0.0, temp_exponent=1.0,
        token_repetition_penalty=params.repetition_penalty,
        token_repetition_range=0 if narrows_penalty_range(params) else params.penalty_range,
        token_repetition_decay=0,
        token_frequency_penalty=params.frequency_penalty,
        token_presence_penalty=params.presence_penalty,
        mirostat=False, mirostat_tau=1.5, mirostat_eta=0.1,
        token_bias=None, cfg_scale=None, dry_multiplier=0.0, xtc_probability=0.0, xtc_threshold=0.1,
    )
    # A -inf logit bias; ids past the vocabulary (a config's stray EOS id) would fail the indexing.
    banned = [i for i in banned if 0 <= i < tokenizer.config.vocab_size]
    if banned:
        settings.disallow_tokens(tokenizer, banned)
    return settings


def stop_conditions(params: SamplingParams, eos_ids: list[int]) -> list[int | str]:
    """Request stops plus every EOS id (nothing stops on EOS by default); a banned EOS is never sampled."""
    conditions: list[int | str] = [s for s in params.stop if s]
    conditions += params.stop_token_ids
    if not params.ban_eos_token:
        conditions += eos_ids
    return list(dict.fromkeys(conditions))


def tokenizer_token(tokenizer: Any, name: str) -> str:
    value = getattr(tokenizer, name, "")
    return value if isinstance(value, str) else ""


def narrows_penalty_range(params: SamplingParams) -> bool:
    # exllamav2 counts the prompt in frequency/presence penalties; OpenAI counts only the answer.
    return (params.frequency_penalty != 0 or params.presence_penalty != 0) and params.penalty_range == -1


def token_count(result: dict[str, Any]) -> int:
    token_ids = result.get("token_ids")
    return int(token_ids.shape[-1]) if token_ids is not None else 0


def result_chunk(result: dict[str, Any], generated: int) -> GenerationChunk:
    text = result.get("text", "")  # absent in some results, e.g. the last one after a stop token
    if not result["eos"]:
        return GenerationChunk(text=text, token_count=generated)
    return GenerationChunk(
        text=text,
        token_count=result.get("new_tokens", generated),
        finish_reason="length" if result.get("eos_reason") == "max_new_tokens" else "stop",
        stop_str=result.get("eos_triggering_string"),
        prompt_tokens=result.get("prompt_tokens", 0),
        completion_tokens=result.get("new_tokens", generated),
    )


# Stopping jobs from any thread


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def run_on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], inline: Callable[[], None]) -> None:
    """Await `coro` on `loop` from another thread; on the loop's own thread (or a stopped loop) run `inline`."""
    if loop.is_closed():
        coro.close()
    elif loop.is_running() and _current_loop() is not loop:
        asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=LOOP_TIMEOUT_S)
    else:
        # Waiting for the loop from its own thread would deadlock.
        coro.close()
        inline()


async def cancel_jobs(generator: Any, jobs: list[Any]) -> None:
    for job in jobs:
        if job.job in generator.jobs:
            await job.cancel()
        # A consumer already waiting on the job's queue never looks at `cancelled` again.
        await job.put_result(GenerationAbortedError())


def halt_jobs(generator: Any, jobs: list[Any]) -> None:
    # We hold the loop's thread (or nobody runs the loop), so iterate() is not running now, and a
    # cancelled task never calls it again.
    generator.iteration_task.cancel()
    for job in jobs:
        job.queue.put_nowait(GenerationAbortedError())
