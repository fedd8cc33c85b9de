"""Continuous batching: the one worker thread of a loaded model, and the answers it carries.

An answer that arrives is prefilled alone as soon as the model is between two layers (between two
decode steps, or between two layers of the step under way), its first token streamed at once, and it
joins the running batch at the next step; from then on every decode step is one forward pass
that gives each answer in flight its next token, sampled with that answer's own settings and seed.
An answer that ends (EOS, stop string, max_tokens) or is cancelled leaves the batch at once.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from tabby.engines.answer import Answer, Decode
from tabby.engines.rows import MAX_ROWS, decode_step, prefill
from tabby.engines.sampling import sample_next


class Batch:
    """Runs the answers of one model on a worker thread, so the event loop stays free to serve HTTP."""

    def __init__(self, model: Any, stop_token_ids: list[int], decode: Decode, name: str) -> None:
        self.model = model
        self.stop_token_ids = stop_token_ids
        self.decode_text = decode
        self.steps = 0  # decode steps (shared forward passes) so far
        self.widest = 0  # the most answers one decode step has carried
        self.width = 0  # the answers the latest decode step carried
        self.joined_mid_step = 0  # answers prefilled between two layers of a decode step
        self._pending: list[Answer] = []
        self._running: list[Answer] = []
        self._joined: list[Answer] = []  # prefilled during a decode step: they join at the next one
        self._stepping = False
        self._hooks = _between_layers(model, weakref.ref(self))
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"generate-{name}", daemon=True)
        self._thread.start()

    def submit(self, answer: Answer) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("The model was unloaded.")
            self._pending.append(answer)
            self._cond.notify()

    def stop(self) -> None:
        """End the worker; answers still waiting or running get an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        for answer in self._pending + self._running + self._joined:
            answer.push(RuntimeError("The model was unloaded."))
        self._pending.clear()
        self._running.clear()
        self._joined.clear()
        for hook in self._hooks:
            hook.remove()
        self.model = None  # the batch must not keep the weights alive

    def _run(self) -> None:
        with torch.inference_mode():
            while (arrivals := self._arrivals()) is not None:
                for answer in arrivals:
                    self._join(answer)
                self._running = [answer for answer in self._running if not self._left(answer)]
                if self._running:
                    self._step()

    def _arrivals(self) -> list[Answer] | None:
        """The answers that may join now (as many as there is room for); None when stopping."""
        with self._cond:
            while not self._pending and not self._running and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            room = max(0, MAX_ROWS - len(self._running))
            arrivals, self._pending = self._pending[:room], self._pending[room:]
            return arrivals

    def _join(self, answer: Answer, batch: list[Answer] | None = None) -> None:
        """Prefill an arrival alone, stream its first token; it joins `batch` (the running one) unless
        already done."""
        if answer.cancelled:
            return
        try:
            logits, cache = prefill(self.model, answer.prompt_ids)
            if not answer.take(self._sample(answer, logits), self.stop_token_ids, self.decode_text):
                answer.cache = cache
                (self._running if batch is None else batch).append(answer)
        except Exception as exc:  # noqa: BLE001  a failed prefill ends that answer only
            answer.push(exc)

    def between_layers(self) -> None:
        """Before each layer of a decode step: answers that arrived meanwhile are prefilled now, instead
        of waiting for the step's end (the step's own numbers do not change)."""
        if not self._stepping or not self._pending:
            return
        self._stepping = False  # the prefills' own layers pass through here too
        try:
            with self._cond:
                room = 0 if self._stopping else max(0, MAX_ROWS - len(self._running) - len(self._joined))
                arrivals, self._pending = self._pending[:room], self._pending[room:]
            for answer in arrivals:
                self._join(answer, self._joined)
            self.joined_mid_step += len(arrivals)
        finally:
            self._stepping = True

    @staticmethod
    def _left(answer: Answer) -> bool:
        if answer.cancelled:
            answer.cache = None
        return answer.cancelled

    def _step(self) -> None:
        """One shared forward pass: every running answer gets its next token; those that end leave."""
        running = self._running
        self._stepping = True
        try:
            logits = decode_step(
                self.model, [a.generated[-1] for a in running], [a.position for a in running], [a.cache for a in running]
            )
        except Exception as exc:  # noqa: BLE001  a failed shared step ends the answers it carried
            for answer in running:
                answer.push(exc)
                answer.cache = None
            self._running, self._joined = self._joined, []
            return
        finally:
            self._stepping = False
        self.steps += 1
        self.width = len(running)
        self.widest = max(self.widest, self.width)
        staying: list[Answer] = []
        for answer, row in zip(running, logits):
            if not answer.cancelled and not self._advance(answer, row):
                staying.append(answer)
            else:
                answer.cache = None
        self._running, self._joined = staying + self._joined, []

    def _advance(self, answer: Answer, logits: torch.Tensor) -> bool:
        """Sample and stream one answer's next token; True when it has ended."""
        try:
            return answer.take(self._sample(answer, logits), self.stop_token_ids, self.decode_text)
        except Exception as exc:  # noqa: BLE001  a failed sample ends that answer only
            answer.push(exc)
            return True

    def _sample(self, answer: Answer, logits: torch.Tensor) -> int:
        context = answer.prompt_ids + answer.generated
        return sample_next(logits, context, answer.generated, answer.params, answer.generator, answer.banned(self.stop_token_ids))


def _between_layers(model: Any, batch: weakref.ref[Batch]) -> list[Any]:
    """Hooks before each decoder layer calling `Batch.between_layers` (the batch held weakly: the model
    must not keep it, nor it the model, alive). None for a model whose layers are not found."""
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        return []

    def hook(module: torch.nn.Module, args: Any) -> None:
        owner = batch()
        if owner is not None:
            owner.between_layers()

    return [layer.register_forward_pre_hook(hook) for layer in layers]
