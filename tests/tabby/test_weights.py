"""Reading weights straight into the tensors' memory, and the torch engine's load built on it."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from tabby.engines import torch_engine
from tabby.engines.base import LoadOptions, ModelFolderError, SamplingParams
from tabby.engines.torch_engine import TorchEngine, module_groups
from tabby.engines.weights import READ_AHEAD, TensorEntry, WeightReader, block_size, index_tensors
from tests.tabby.conftest import SMALL, TINY


@pytest.fixture
def tiny_dir(demo_models: Path) -> Path:
    return demo_models / TINY


def read_all(folder: Path, threads: int = 2, throttle_mbps: float = 0.0, reserve: bool = False) -> dict[str, torch.Tensor]:
    entries = index_tensors(folder)
    reader = WeightReader(throttle_mbps, threads=threads, reserve=block_size(entries) if reserve else 0)
    try:
        tensors: dict[str, torch.Tensor] = {}
        for module in reader.read_modules({name: entries[name] for name in names} for _, names in module_groups(list(entries))):
            tensors.update(module)
        return tensors
    finally:
        reader.close()


@pytest.mark.parametrize("reserve", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_tensors_read_equal_the_files_tensors(tiny_dir: Path, threads: int, reserve: bool) -> None:
    expected = load_file(tiny_dir / "model.safetensors")
    got = read_all(tiny_dir, threads, reserve=reserve)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_every_dtype_and_shape_is_read_as_written_across_files(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    first = {
        "a.half": torch.randn(7, 13, generator=generator).half(),
        "a.bf16": torch.randn(33, generator=generator).bfloat16(),
        "a.ids": torch.arange(-5, 1000, dtype=torch.int64),
        "a.mask": torch.rand(9, 3, generator=generator) > 0.5,
        "a.empty": torch.empty(0, 4),
    }
    # Larger than a read piece, so one tensor is read in several pieces (by several threads).
    second = {"b.big": torch.randn(3, 1 << 20, generator=generator), "b.bytes": torch.randint(0, 255, (4099,), dtype=torch.uint8)}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    entries = index_tensors(tmp_path)
    reader = WeightReader(threads=2)
    got = {**reader.read_module({n: entries[n] for n in first}), **reader.read_module({n: entries[n] for n in second})}
    reader.close()
    for name, tensor in {**first, **second}.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name
        assert got[name].data_ptr() % 64 == 0 or tensor.numel() == 0, name  # aligned like torch's own tensors


def test_a_truncated_weight_file_is_refused_with_a_sentence(tiny_dir: Path, tmp_path: Path) -> None:
    data = (tiny_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFolderError, match="model.safetensors is truncated"):
        index_tensors(tmp_path)


def test_a_file_cut_during_the_load_fails_the_load_with_a_sentence(tiny_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    data = (tiny_dir / "model.safetensors").read_bytes()
    target.write_bytes(data)
    entries = index_tensors(tmp_path)
    with target.open("r+b") as f:  # replaced by a shorter file after the headers were read
        f.truncate(len(data) // 2)
    reader = WeightReader()
    with pytest.raises(ModelFolderError, match="ended early"):
        for _, names in module_groups(list(entries)):
            reader.read_module({name: entries[name] for name in names})
    reader.close()


@pytest.mark.parametrize("reserve", [False, True])
def test_the_throttle_holds_the_read_to_the_disk_speed_asked_for(tiny_dir: Path, reserve: bool) -> None:
    size = sum(e.nbytes for e in index_tensors(tiny_dir).values())
    started = time.monotonic()
    read_all(tiny_dir, throttle_mbps=20, reserve=reserve)
    assert time.monotonic() - started >= size / 20e6 * 0.95


@pytest.mark.parametrize("reserve", [False, True])
def test_dropping_the_tensors_gives_their_memory_back(demo_models: Path, reserve: bool) -> None:
    process = psutil.Process()
    folder = demo_models / SMALL
    before = process.memory_info().rss
    tensors = read_all(folder, reserve=reserve)
    loaded = process.memory_info().rss
    del tensors
    after = process.memory_info().rss
    assert loaded - before > 150_000_000  # really read, not mapped for later
    assert after - before < 20_000_000


def test_modules_are_laid_out_one_after_another_in_the_reserved_block(tiny_dir: Path) -> None:
    entries = index_tensors(tiny_dir)
    groups = module_groups(list(entries))
    reader = WeightReader(threads=2, reserve=block_size(entries))
    modules = [reader.read_module({name: entries[name] for name in names}) for _, names in groups]
    reader.close()  # the tensors keep the block; closing the reader does not take it from them
    starts = [min(t.data_ptr() for t in module.values() if t.numel()) for module in modules]
    ends = [max(t.data_ptr() + t.nbytes for t in module.values()) for module in modules]
    assert all(end <= start for end, start in zip(ends, starts[1:]))  # in reading order, none overlapping
    assert ends[-1] - starts[0] <= block_size(entries)  # all in the one block
    expected = load_file(tiny_dir / "model.safetensors")
    for module in modules:
        for name, tensor in module.items():
            assert torch.equal(tensor, expected[name]), name
            assert tensor.data_ptr() % 64 == 0 or tensor.numel() == 0, name


def test_a_module_that_does_not_fit_the_reserve_gets_memory_of_its_own(tiny_dir: Path) -> None:
    entries = index_tensors(tiny_dir)
    (_, first), (_, second), *_ = module_groups(list(entries))
    reader = WeightReader(reserve=block_size({name: entries[name] for name in first}))
    got = {
        **reader.read_module({name: entries[name] for name in first}),
        **reader.read_module({name: entries[name] for name in second}),
    }
    reader.close()
    expected = load_file(tiny_dir / "model.safetensors")
    for name in first + second:
        assert torch.equal(got[name], expected[name]), name


def huge_page_bytes() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
    reason="no transparent huge pages on this system",
)
def test_a_whole_load_lands_in_huge_pages(demo_models: Path) -> None:
    # One fault per 2 MiB, not per 4 KiB: no module ends in a part-used huge page that falls back to small ones.
    folder = demo_models / SMALL
    size = block_size(index_tensors(folder))
    before = huge_page_bytes()
    tensors = read_all(folder, reserve=True)
    assert huge_page_bytes() - before >= size - (4 << 20)
    del tensors


def test_the_engine_loads_the_files_weights_one_module_per_step(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[str]] = []
    handed_out: list[dict[str, torch.Tensor]] = []

    class RecordingReader(WeightReader):
        def _start(self, entries: Mapping[str, TensorEntry]) -> Any:
            started.append(list(entries))
            return super()._start(entries)

        def read_modules(self, modules: Iterable[Mapping[str, TensorEntry]]) -> Iterator[dict[str, torch.Tensor]]:
            for module in super().read_modules(modules):
                handed_out.append(module)
                yield module

    monkeypatch.setattr(torch_engine, "WeightReader", RecordingReader)
    expected = load_file(tiny_dir / "model.safetensors")
    engine = TorchEngine(tiny_dir, LoadOptions())
    steps = []
    for k, n in engine.load_gen():
        assert len(handed_out) == k  # step k comes once module k is read
        assert all(torch.equal(tensor, expected[name]) for name, tensor in handed_out[-1].items())  # all of it
        assert len(started) <= k + READ_AHEAD  # the reads run only a few modules ahead of the steps
        steps.append((k, n))
    assert steps == [(k, len(started)) for k in range(1, len(started) + 1)]
    assert len(started) == 1 + 2 * engine.hf_config.num_hidden_layers + 2
    assert sorted(name for names in started for name in names) == sorted(expected)  # each tensor read once
    state = engine.model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    engine.unload()


def test_a_module_handed_out_is_complete_and_the_reads_may_stop_before_the_rest(tiny_dir: Path) -> None:
    entries = index_tensors(tiny_dir)
    modules = [{name: entries[name] for name in names} for _, names in module_groups(list(entries))]
    expected = load_file(tiny_dir / "model.safetensors")
    started: list[list[str]] = []

    class RecordingReader(WeightReader):
        def _start(self, entries: Mapping[str, TensorEntry]) -> Any:
            started.append(list(entries))
            return super()._start(entries)

    reader = RecordingReader(threads=2, reserve=block_size(entries))
    reading = reader.read_modules(modules)
    first = next(reading)
    assert first.keys() == modules[0].keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, expected[name]), name
    reading.close()  # a load that stops early: the reads under way end quietly, no others start
    reader.close()
    assert 1 < len(started) <= 1 + READ_AHEAD < len(modules)


def test_a_model_in_half_precision_loads_in_float32_with_the_files_values(tiny_dir: Path, tmp_path: Path) -> None:
    for file in tiny_dir.iterdir():
        if file.suffix != ".safetensors":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    weights = load_file(tiny_dir / "model.safetensors")
    save_file({name: t.bfloat16() for name, t in weights.items()}, tmp_path / "model.safetensors")
    engine = TorchEngine(tmp_path, LoadOptions())
    for _ in engine.load_gen():
        pass
    state = engine.model.state_dict()
    for name, tensor in weights.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor.bfloat16().to(torch.float32)), name
    engine.unload()


def test_the_engine_has_its_tokenizer_once_loaded_and_a_broken_one_fails_the_load(tiny_dir: Path, tmp_path: Path) -> None:
    engine = TorchEngine(tiny_dir, LoadOptions())
    for _ in engine.load_gen():
        pass
    assert engine.decode(engine.encode("Hello there", add_bos=False)) == "Hello there"
    engine.unload()
    for file in tiny_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "tokenizer.json").write_text("{ this is not json")
    broken = TorchEngine(tmp_path, LoadOptions())
    with pytest.raises(ModelFolderError, match="Failed to read the tokenizer"):
        for _ in broken.load_gen():
            pass
    broken.unload()


def test_unloading_frees_the_weights_at_once_without_a_full_garbage_collection(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full collection walks every object of the process (a tenth of a second and more with torch loaded):
    # nothing of a loaded model may hold its weights in a reference cycle that only such a pass would find.
    collections: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collections.append(generation) or 0)
    engine = TorchEngine(tiny_dir, LoadOptions())
    for _ in engine.load_gen():
        pass
    prompt = engine.encode(engine.render_chat([{"role": "user", "content": "Hello"}]))
    asyncio.run(_answer(engine, prompt))  # the row-by-row head and the batch have run
    weights = [weakref.ref(tensor) for tensor in engine.model.parameters()]
    engine.unload()
    assert not collections
    assert all(ref() is None for ref in weights)


async def _answer(engine: TorchEngine, prompt: list[int]) -> str:
    return "".join([chunk.text async for chunk in engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0))])


def test_tensors_of_the_files_the_model_does_not_take_are_left_out(tiny_dir: Path, tmp_path: Path) -> None:
    # The reads start before the model is built: what it turns out not to take is read at most, never given to it.
    for file in tiny_dir.iterdir():
        if file.suffix != ".safetensors":
            (tmp_path / file.name).write_bytes(file.read_bytes())
    weights = load_file(tiny_dir / "model.safetensors")
    extra = {"aaa_vision_tower.proj.weight": torch.ones(4, 4), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    save_file({**weights, **extra}, tmp_path / "model.safetensors")
    engine = TorchEngine(tmp_path, LoadOptions())
    steps = list(engine.load_gen())
    assert steps == [(k, 1 + 2 * engine.hf_config.num_hidden_layers + 2) for k in range(1, len(steps) + 1)]
    state = engine.model.state_dict()
    assert not set(extra) & set(state)
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    engine.unload()
