"""One answer in flight: its tokens, the part of its text already streamed, and when it ends.

The batch (`tabby.engines.batch`) computes tokens; an answer turns each of its tokens into streamed
text: it ends at an EOS or stop token, at a stop string (text that could still become one is held
back, never streamed) or at `max_tokens`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tabby.engines.base import GenerationChunk, SamplingParams

Decode = Callable[[list[int]], str]


@dataclass
class Answer:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationChunk | BaseException]
    generator: torch.Generator
    cache: Any = None  # its own KV cache, made by its prefill and grown by every decode step
    generated: list[int] = field(default_factory=list)
    sent_text: str = ""
    cancelled: bool = False

    def push(self, item: GenerationChunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the request's loop is gone
            self.cancelled = True

    @property
    def position(self) -> int:
        """The position of the token the next decode step feeds (the last one sampled)."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def banned(self, stop_token_ids: list[int]) -> list[int]:
        """Tokens the sampler may not pick now: EOS while it is banned or min_tokens not reached."""
        params = self.params
        return stop_token_ids if params.ban_eos_token or len(self.generated) < params.min_tokens else []

    def take(self, token: int, stop_token_ids: list[int], decode: Decode) -> bool:
        """Add a sampled token and stream what may be sent; True when the answer has ended."""
        if token in stop_token_ids or token in self.params.stop_token_ids:
            rest = decode(self.generated)[len(self.sent_text) :]
            self.push(self._final(rest.rstrip("\ufffd"), "stop", None))
            return True
        self.generated.append(token)
        return self._emit(decode)

    def _emit(self, decode: Decode) -> bool:
        text = decode(self.generated)
        for stop in self.params.stop:
            at = text.find(stop, max(0, len(self.sent_text) - len(stop)))
            if at >= 0:
                self.push(self._final(text[len(self.sent_text) : at], "stop", stop))
                return True
        if len(self.generated) >= self.params.max_tokens:
            self.push(self._final(text[len(self.sent_text) :], "length", None))
            return True
        safe = len(text) - held_back(text, self.params.stop)
        if safe > len(self.sent_text):
            piece = text[len(self.sent_text) : safe]
            self.sent_text = text[:safe]
            self.push(GenerationChunk(text=piece, token_count=len(self.generated)))
        return False

    def _final(self, text: str, reason: str, stop_str: str | None) -> GenerationChunk:
        return GenerationChunk(
            text=text,
            token_count=len(self.generated),
            finish_reason=reason,
            stop_str=stop_str,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated),
        )


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to hold: an unfinished UTF-8 sequence or a possible stop-string start."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold
