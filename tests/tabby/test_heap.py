"""The garbage collector's full passes walk what the requests create, not the imports nor the loaded model:
each pass holds the interpreter, and every answer in flight waits for it."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tabby.config import load_config
from tabby.heap import collect_all, settle
from tabby.manager import LoadRequest, ModelManager
from tests.tabby.conftest import TINY


@pytest.fixture
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()  # the other tests of this process keep an ordinary heap


def test_a_loaded_model_is_out_of_the_collectors_reach_and_freed_at_unload(demo_models: Path, thawed: None) -> None:
    config = load_config(overrides={"model": {"model_dir": str(demo_models)}})
    manager = ModelManager(config)
    gc.unfreeze()
    tracked_before = len(gc.get_objects())

    async def load_then_unload() -> list[weakref.ref[torch.Tensor]]:
        last = await manager.load_and_wait(LoadRequest(TINY, config.model.load_options()))
        assert last["status"] == "finished", last
        assert manager.engine is not None
        model = manager.engine.model
        tracked = {id(thing) for thing in gc.get_objects()}
        # The model, its modules and weights are frozen, with everything alive before the load.
        assert not {id(model), *(id(module) for module in model.modules())} & tracked
        assert gc.get_freeze_count() >= tracked_before
        assert len(tracked) < gc.get_freeze_count() // 10
        weights = [weakref.ref(tensor) for tensor in model.parameters()]
        del model
        await manager.unload()
        return weights

    weights = asyncio.run(load_then_unload())
    assert all(ref() is None for ref in weights)  # frozen or not, the weights go with the model


def test_a_full_collection_still_reaches_a_frozen_reference_cycle(thawed: None) -> None:
    holder: dict[str, object] = {"weights": torch.ones(1024)}
    holder["itself"] = holder  # a dropped model held in a cycle: only a full collection finds it
    weights = weakref.ref(holder["weights"])
    settle()
    del holder
    gc.collect()
    assert weights() is not None  # an ordinary pass no longer walks what was frozen
    collect_all()
    assert weights() is None
    assert gc.get_freeze_count() > 0  # what is still alive is frozen again
