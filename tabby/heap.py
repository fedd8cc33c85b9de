"""Keeping the garbage collector's full passes off the answers' way.

A full collection walks every object the process tracks and holds the interpreter meanwhile: with
torch and transformers imported and a model built, several hundred thousand objects, a fifth of a
second on a small CPU during which no answer in flight gets a token (seen as one stall of every
stream at once, now and then, under load). What is alive once the server has started, and what a
load built, lives as long as the model: it is frozen (`gc.freeze`), out of the collector's reach, so
its passes walk only what the requests create.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Freeze what is alive now (the imports, a model just loaded); instant, whatever the count."""
    gc.freeze()


def collect_all() -> None:
    """A full collection that reaches the frozen objects too (a dropped model still held in a reference
    cycle), after which what is still alive is frozen again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
