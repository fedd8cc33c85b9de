"""Continuous batching in the torch engine, with the real demo models loaded in-process.

Every answer is compared with the same request answered alone: greedy answers (and sampled ones with
a seed) must be the same tokens, whatever joins, leaves or is cancelled beside them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tabby.engines.base import LoadOptions, SamplingParams
from tabby.engines.torch_engine import TorchEngine
from tests.tabby.conftest import SMALL, TINY

QUESTIONS = [
    "Hi",
    "Write a short note about Python modules.",
    "Explain how a package differs from a module, why namespaces matter, and give two examples of each one of them.",
    "Tell me a story about a cat.",
    "List three colours.",
]


@dataclass
class Streamed:
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    stop_str: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def load(folder: Path) -> Iterator[TorchEngine]:
    engine = TorchEngine(folder, LoadOptions())
    for _ in engine.load_gen():
        pass
    yield engine
    engine.unload()


@pytest.fixture(scope="module")
def tiny(demo_models: Path) -> Iterator[TorchEngine]:
    yield from load(demo_models / TINY)


def prompt(engine: TorchEngine, question: str) -> list[int]:
    return engine.encode(engine.render_chat([{"role": "user", "content": question}]))


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    # A repetition penalty keeps the demo models' greedy answers from looping on one token.
    return SamplingParams(max_tokens=max_tokens, temperature=0, repetition_penalty=1.3, ban_eos_token=True, **extra)  # type: ignore[arg-type]


async def stream(engine: TorchEngine, ids: list[int], params: SamplingParams, after: asyncio.Event | None = None,
                 streamed: Streamed | None = None, signal_at: tuple[int, asyncio.Event] | None = None) -> Streamed:
    """Stream one answer (once `after` is set); set signal_at's event once that many pieces came."""
    if after is not None:
        await after.wait()
    streamed = streamed or Streamed()
    async for chunk in engine.generate(list(ids), params):
        streamed.pieces.append(chunk.text)
        streamed.tokens = chunk.token_count
        streamed.finish_reason, streamed.stop_str = chunk.finish_reason, chunk.stop_str
        if signal_at and len(streamed.pieces) >= signal_at[0]:
            signal_at[1].set()
    return streamed


def params_for(n: int) -> SamplingParams:
    return greedy(12 + 7 * n)  # different lengths: the short ones leave while the long ones go on


async def check_greedy_answers_in_a_batch_equal_each_alone(engine: TorchEngine) -> None:
    prompts = [prompt(engine, q) for q in QUESTIONS]
    alone = [await stream(engine, ids, params_for(n)) for n, ids in enumerate(prompts)]
    steps_before = engine._batch.steps if engine._batch else 0
    # Each joins once the one before it has streamed two pieces: joins into a running batch, at different points.
    gates = [asyncio.Event() for _ in prompts]
    gates[0].set()
    tasks = [
        stream(engine, ids, params_for(n), after=gates[n], signal_at=(2, gates[n + 1]) if n + 1 < len(gates) else None)
        for n, ids in enumerate(prompts)
    ]
    together = await asyncio.gather(*tasks)
    for one, other in zip(alone, together):
        assert (other.text, other.tokens, other.finish_reason) == (one.text, one.tokens, one.finish_reason)
    assert len({one.text for one in alone}) == len(alone)  # really different answers
    assert engine._batch is not None
    # Shared forward passes: far fewer decode steps than tokens, and at some step every answer ran at once.
    assert engine._batch.steps - steps_before < sum(one.tokens for one in alone) * 2 // 3
    assert engine._batch.widest >= len(prompts)


async def test_greedy_answers_in_a_batch_equal_each_answer_alone(tiny: TorchEngine) -> None:
    await check_greedy_answers_in_a_batch_equal_each_alone(tiny)


@pytest.mark.slow
async def test_greedy_answers_in_a_batch_equal_each_answer_alone_on_the_small_model(demo_models: Path) -> None:
    for engine in load(demo_models / SMALL):
        await check_greedy_answers_in_a_batch_equal_each_alone(engine)


async def test_sampled_answers_with_their_own_settings_in_one_batch_equal_each_alone(tiny: TorchEngine) -> None:
    settings = [
        SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=1, ban_eos_token=True),
        SamplingParams(max_tokens=22, temperature=1.2, top_k=40, min_p=0.02, seed=2, ban_eos_token=True),
        SamplingParams(max_tokens=26, temperature=0, repetition_penalty=1.5, penalty_range=16, ban_eos_token=True),
        SamplingParams(max_tokens=18, temperature=0.7, presence_penalty=0.5, frequency_penalty=0.4, seed=3, ban_eos_token=True),
    ]
    prompts = [prompt(tiny, q) for q in QUESTIONS[: len(settings)]]
    alone = [await stream(tiny, ids, params) for ids, params in zip(prompts, settings)]
    together = await asyncio.gather(*(stream(tiny, ids, params) for ids, params in zip(prompts, settings)))
    assert [(s.text, s.tokens) for s in together] == [(s.text, s.tokens) for s in alone]
    assert [s.tokens for s in together] == [30, 22, 26, 18]


async def test_an_answer_joins_a_running_batch_and_leaves_it_while_the_other_goes_on(tiny: TorchEngine) -> None:
    long_ids, short_ids = prompt(tiny, QUESTIONS[2]), prompt(tiny, QUESTIONS[0])
    long_alone = await stream(tiny, long_ids, greedy(60))
    short_alone = await stream(tiny, short_ids, greedy(8))
    joined = asyncio.Event()
    long_run = Streamed()
    long_task = asyncio.create_task(stream(tiny, long_ids, greedy(60), streamed=long_run, signal_at=(5, joined)))
    short = await stream(tiny, short_ids, greedy(8), after=joined)
    # The short answer came and went while the long one was still streaming.
    assert long_run.finish_reason is None and 5 <= len(long_run.pieces) < 60
    long = await long_task
    assert (short.text, short.tokens) == (short_alone.text, short_alone.tokens)
    assert (long.text, long.tokens, long.finish_reason) == (long_alone.text, 60, "length")


async def test_an_answer_arriving_during_a_decode_step_gets_its_first_token_before_the_step_ends(tiny: TorchEngine) -> None:
    """It is prefilled between two of the step's layers (its first token does not wait for the step under
    way) and joins the batch at the next step; both answers are what they are alone."""
    batch = tiny._batch
    assert batch is not None and tiny.model is not None
    long_ids, short_ids = prompt(tiny, QUESTIONS[2]), prompt(tiny, QUESTIONS[0])
    long_alone = await stream(tiny, long_ids, greedy(40))
    short_alone = await stream(tiny, short_ids, greedy(8))
    armed, held = threading.Event(), threading.Event()

    def hold(module: torch.nn.Module, args: object) -> None:
        # The first layer of a decode step waits, once armed, until the short answer has arrived.
        if armed.is_set() and batch._stepping and not held.is_set():
            held.set()
            deadline = time.monotonic() + 10
            while not batch._pending and time.monotonic() < deadline:
                time.sleep(0.001)

    hook = tiny.model.base_model.layers[0].register_forward_pre_hook(hook=hold)
    try:
        joined_before = batch.joined_mid_step
        under_way = asyncio.Event()
        long_task = asyncio.create_task(stream(tiny, long_ids, greedy(40), signal_at=(5, under_way)))
        await under_way.wait()
        armed.set()
        assert await asyncio.to_thread(held.wait, 10)  # a decode step waits at its first layer
        short = await stream(tiny, short_ids, greedy(8))
        long = await long_task
    finally:
        hook.remove()
    assert batch.joined_mid_step == joined_before + 1
    assert (short.text, short.tokens) == (short_alone.text, short_alone.tokens)
    assert (long.text, long.tokens) == (long_alone.text, long_alone.tokens)


async def test_cancelling_one_answer_mid_batch_leaves_the_others_untouched(tiny: TorchEngine) -> None:
    prompts = [prompt(tiny, q) for q in QUESTIONS[1:4]]
    alone = [await stream(tiny, ids, greedy(40)) for ids in prompts]
    halfway = asyncio.Event()
    cancelled, first_run = Streamed(), Streamed()
    first = asyncio.create_task(stream(tiny, prompts[0], greedy(40), streamed=first_run))
    doomed = asyncio.create_task(stream(tiny, prompts[1], greedy(40), streamed=cancelled, signal_at=(4, halfway)))
    last = asyncio.create_task(stream(tiny, prompts[2], greedy(40)))
    await halfway.wait()
    assert tiny._batch is not None and tiny._batch.width == 3
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert cancelled.finish_reason is None and len(cancelled.pieces) < 40
    assert cancelled.text == alone[1].text[: len(cancelled.text)]  # it was the same answer up to there
    # Two tokens later (a step in flight at the cancel gives at most one), the steps carry the other two only.
    tokens = first_run.tokens
    while first_run.tokens < tokens + 2 and not first.done():
        await asyncio.sleep(0.005)
    assert tiny._batch.width == 2
    results = await asyncio.gather(first, last)
    assert [(r.text, r.tokens) for r in results] == [(alone[0].text, 40), (alone[2].text, 40)]


def stop_string(text: str, at: int) -> str:
    """Three characters of `text` from about `at` on, with no space at either end."""
    return next(text[i : i + 3] for i in range(at, len(text) - 2) if text[i : i + 3].strip() == text[i : i + 3])


async def test_each_answer_in_a_batch_ends_at_its_own_stop_string(tiny: TorchEngine) -> None:
    prompts = [prompt(tiny, q) for q in QUESTIONS[:4]]
    full = [await stream(tiny, ids, greedy(40)) for ids in prompts]
    stops = [stop_string(one.text, len(one.text) * (n + 1) // 6) for n, one in enumerate(full)]
    cut = await asyncio.gather(*(stream(tiny, ids, greedy(40, stop=[stop])) for ids, stop in zip(prompts, stops)))
    for one, stop, got in zip(full, stops, cut):
        assert (got.finish_reason, got.stop_str) == ("stop", stop)
        assert got.text == one.text[: one.text.index(stop)]
        # Text that could be the start of the stop string was held back, never streamed.
        assert all(stop not in "".join(got.pieces[: k + 1]) for k in range(len(got.pieces)))
