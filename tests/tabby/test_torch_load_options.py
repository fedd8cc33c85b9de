"""The torch engine's load options, on the tiny demo model's real weights in this process: what it applies
(context, cache size, RoPE scaling, a named prompt template) and the sentences it logs for what it adjusts
or ignores, as TabbyAPI does."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tabby.engines.base import LoadOptions
from tabby.engines.torch_engine import TorchEngine

TINY = "Tiny-Chat-5M"
Loader = Callable[..., TorchEngine]


@pytest.fixture
def loaded(demo_models: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., TorchEngine]]:
    engines: list[TorchEngine] = []

    def load(folder: Path | None = None, **options: object) -> TorchEngine:
        engine = TorchEngine(folder or demo_models / TINY, LoadOptions(**options))  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, logger="tabby"):
            for _ in engine.load_gen():
                pass
        engines.append(engine)
        return engine

    yield load
    for engine in engines:
        engine.unload()


def warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_without_options_the_model_loads_as_before(loaded: Loader, caplog: pytest.LogCaptureFixture) -> None:
    card = loaded().card_parameters()
    assert (card["max_seq_len"], card["cache_size"], card["rope_scale"], card["rope_alpha"]) == (2048, 2048, 1.0, 1.0)
    assert card["prompt_template"] == "tokenizer_config"
    assert warnings(caplog) == ""


def test_a_longer_context_than_the_models_is_limited_unless_rope_scaling_stretches_it(
    loaded: Loader, caplog: pytest.LogCaptureFixture
) -> None:
    assert loaded(max_seq_len=4096).max_seq_len == 2048
    assert "The given max_seq_len (4096) is larger than the model's own (2048) and will be limited to 2048 tokens" in warnings(
        caplog
    )
    plain = loaded().model.model.rotary_emb.inv_freq.clone()
    stretched = loaded(max_seq_len=4096, rope_scale=2.0, rope_alpha=2.0)
    assert stretched.max_seq_len == 4096
    card = stretched.card_parameters()
    assert (card["rope_scale"], card["rope_alpha"]) == (2.0, 2.0)
    # Linear scaling halves every frequency; NTK alpha 2 raises the base by 2^(32/30), lowering the others more.
    inv_freq = stretched.model.model.rotary_emb.inv_freq
    assert torch.isclose(inv_freq[0], plain[0] / 2)
    assert torch.all(inv_freq[1:] < plain[1:] / 2)


def test_the_cache_size_is_rounded_to_whole_pages_and_caps_the_context(loaded: Loader, caplog: pytest.LogCaptureFixture) -> None:
    engine = loaded(max_seq_len=2048, cache_size=1000)
    assert (engine.max_seq_len, engine.card_parameters()["cache_size"]) == (1024, 1024)
    said = warnings(caplog)
    assert "The given cache_size (1000) is not a multiple of 256; using 1024 tokens." in said
    assert "The given max_seq_len (2048) is larger than the cache size and will be limited to 1024 tokens." in said


def test_options_the_cpu_engine_cannot_apply_are_ignored_and_said(loaded: Loader, caplog: pytest.LogCaptureFixture) -> None:
    engine = loaded(cache_mode="Q4", chunk_size=512, gpu_split_auto=False, gpu_split=[20.0])
    assert engine.card_parameters()["cache_mode"] == "FP32"
    said = warnings(caplog)
    assert "cache_mode Q4 is ignored: the torch engine keeps its cache in float32." in said
    assert "chunk_size 512 is ignored: the torch engine reads a prompt in one pass." in said
    assert "gpu_split_auto is ignored: the torch engine runs on the CPU." in said
    assert "gpu_split is ignored: the torch engine runs on the CPU." in said


def test_a_named_prompt_template_is_used_for_chats(
    demo_models: Path, tmp_path: Path, loaded: Loader, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / TINY
    shutil.copytree(demo_models / TINY, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    own = config["chat_template"]
    terse = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config["chat_template"] = [{"name": "default", "template": own}, {"name": "terse", "template": terse}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    engine = loaded(folder, prompt_template="terse")
    assert engine.render_chat(messages) == "[system] Be brief.\n[user] Hi\n[assistant]"
    assert engine.card_parameters()["prompt_template"] == "terse"
    unknown = loaded(folder, prompt_template="no-such-template")
    assert "[assistant]" not in unknown.render_chat(messages)
    assert "prompt_template no-such-template was not found" in warnings(caplog)
