"""The exllamav2 engine.

Folder checks and the import guard run for real. exllamav2 itself needs CUDA, so the rest drives the
engine against a stand-in for the GPU-only library (below): a small recording package, injected
through `sys.modules`, whose signatures, assertions and results follow exllamav2 0.3.2.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import sys
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import torch

from tabby.engines.base import (
    ContextLengthError,
    EngineUnavailableError,
    GenerationChunk,
    LoadOptions,
    ModelFolderError,
    SamplingParams,
)
from tabby.engines.exllamav2 import ExLlamaV2Engine, GenerationAbortedError, import_exllamav2
from tabby.templating import ChatTemplateError, find_chat_template

LLAMA31_EOS = [128001, 128008, 128009]
SPECIAL_PIECES = {128001: "<|end_of_text|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
T = TypeVar("T")


# Stand-in for the GPU-only exllamav2 library ---------------------------------------------------


@dataclass
class StandIn:
    """What the stand-in library was asked to do, and how its fake model answers."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    reply: str = "Hello world"
    end_token: int = 128009  # the model ends its reply with the *last* Llama 3.1 EOS id
    stall: bool = False  # iterate() makes no progress, like a long prefill
    fail_next_iterate: bool = False
    jobs: list[Any] = field(default_factory=list)

    def record(self, name: str, **details: Any) -> None:
        self.calls.append((name, details))

    def record_returning(self, name: str, value: int) -> int:
        self.record(name)
        return value

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def details(self, name: str) -> dict[str, Any]:
        return next(d for n, d in self.calls if n == name)


class Recorded:
    standin: StandIn


class ExLlamaV2Config(Recorded):
    def __init__(self, model_dir: str | None = None) -> None:
        self.model_dir = model_dir
        self.max_seq_len, self.max_input_len, self.max_attention_size = 2048, 2048, 2048**2
        self.max_output_len: int | None = None
        self.scale_pos_emb, self.scale_alpha_value = 1.0, 1.0
        self.no_flash_attn, self.max_batch_size = False, 1
        self.standin.record("ExLlamaV2Config", model_dir=model_dir)
        if model_dir is not None:
            self.prepare()

    def prepare(self, no_tensors: bool = False) -> None:
        assert self.model_dir is not None, "No model_dir specified in ExLlamaV2Config"
        folder = Path(self.model_dir)
        config = json.loads((folder / "config.json").read_text())
        self.architecture = config["architectures"][0]
        self.max_seq_len = config.get("max_position_embeddings", 2048)
        self.vocab_size = config.get("vocab_size", 128256)
        eos = config.get("eos_token_id")
        self.eos_token_id = eos[0] if isinstance(eos, list) else eos  # exllamav2 keeps only the first
        if (folder / "generation_config.json").exists():
            eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
            self.generation_config = {"eos_token_id": [eos] if isinstance(eos, int) else eos}
        if not list(folder.glob("*.safetensors")):
            raise ValueError(f" ## No .safetensors files found in {folder}")
        self.standin.record("prepare")

    def arch_compat_overrides(self, quiet: bool = False, warn_only: bool = False) -> None:
        self.standin.record(
            "arch_compat_overrides", quiet=quiet, warn_only=warn_only, max_seq_len=self.max_seq_len,
            max_input_len=self.max_input_len, max_attention_size=self.max_attention_size,
            max_output_len=self.max_output_len, scale_pos_emb=self.scale_pos_emb,
            scale_alpha_value=self.scale_alpha_value,
        )


class ExLlamaV2(Recorded):
    def __init__(self, config: ExLlamaV2Config, lazy_load: bool = False, archparams: Any = None) -> None:
        self.config = config
        self.modules = ["embedding", "attn.0", "mlp.0", "attn.1", "mlp.1", "norm", "head"]
        self.loaded = 0
        self.standin.record("ExLlamaV2", model=self, no_flash_attn=config.no_flash_attn)

    def load_gen(
        self, gpu_split: list[float] | None = None, lazy: bool = False, stats: bool = False,
        callback: Any = None, callback_gen: Any = None,
    ) -> Iterator[Any]:
        self.standin.record("load_gen", gpu_split=gpu_split)
        yield from self._load(callback_gen)

    def load_autosplit_gen(
        self, cache: ExLlamaV2Cache, reserve_vram: int | list[int] | None = None, last_id_only: bool = False,
        callback: Any = None, callback_gen: Any = None,
    ) -> Iterator[Any]:
        assert cache.lazy, "Cache must be lazy for autosplit"
        self.standin.record("load_autosplit_gen", reserve_vram=reserve_vram, last_id_only=last_id_only)
        self.config.max_input_len = min(self.config.max_input_len, self.config.max_seq_len)
        devices = torch.cuda.device_count()
        if reserve_vram is None:
            reserve_vram = [192 * 1024**2] + [64 * 1024**2] * (devices - 1)
        elif isinstance(reserve_vram, int):
            reserve_vram = [reserve_vram] * devices
        for device in range(devices):  # the model fills GPU 0, then GPU 1, ...: each reads its reserve
            assert reserve_vram[device] >= 0
        yield from self._load(callback_gen)

    def _load(self, callback_gen: Any) -> Iterator[Any]:
        n = len(self.modules)
        for i in range(n):
            if callback_gen is not None:
                yield from callback_gen(i, n)
            self.loaded += 1
        if callback_gen is not None:
            yield from callback_gen(n, n)

    def forward(self, input_ids: torch.Tensor, cache: Any = None, preprocess_only: bool = False, **kw: Any) -> None:
        self.standin.record("forward", shape=tuple(input_ids.shape), preprocess_only=preprocess_only)
        if self.standin.reply == "OOM":
            raise RuntimeError("CUDA out of memory (stand-in)")

    def unload(self) -> None:
        self.standin.record("model.unload")
        self.modules = []


class ExLlamaV2Cache(Recorded):
    def __init__(
        self, model: ExLlamaV2, batch_size: int = 1, max_seq_len: int = -1, copy_from: Any = None,
        lazy: bool = False, num_key_value_heads: int | None = None, fixed_device: int | None = None,
    ) -> None:
        self.model, self.batch_size, self.lazy = model, batch_size, lazy
        self.max_seq_len = model.config.max_seq_len if max_seq_len == -1 else max_seq_len
        self.standin.record(
            "cache", kind=type(self).__name__, max_seq_len=self.max_seq_len, lazy=lazy, modules_loaded=model.loaded
        )


class ExLlamaV2Cache_Q4(ExLlamaV2Cache): ...


class ExLlamaV2Cache_Q6(ExLlamaV2Cache): ...


class ExLlamaV2Cache_Q8(ExLlamaV2Cache): ...


class ExLlamaV2Cache_8bit(ExLlamaV2Cache): ...


class ExLlamaV2Tokenizer(Recorded):
    bos_token, eos_token, unk_token, pad_token = "<s>", "</s>", "<unk>", ""

    def __init__(self, config: ExLlamaV2Config, lazy_init: bool = True, force_json: bool = False,
                 force_spm: bool = False) -> None:
        if not (Path(str(config.model_dir)) / "tokenizer.json").exists():
            raise FileNotFoundError("No supported tokenizer found.")
        self.config = config
        self.bos_token_id, self.eos_token_id = 1, config.eos_token_id
        self.standin.record("ExLlamaV2Tokenizer")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, encode_special_tokens: bool = False,
               return_offsets: bool = False, embeddings: Any = None) -> torch.Tensor:
        self.standin.record("encode", add_bos=add_bos, encode_special_tokens=encode_special_tokens)
        return torch.tensor([[1] * add_bos + [ord(c) for c in text]], dtype=torch.long)

    def decode(self, ids: torch.Tensor, decode_special_tokens: bool = False) -> str | list[str]:
        rows = ["".join(chr(i) for i in row.tolist() if i >= 32) for row in ids.view(-1, ids.shape[-1])]
        return rows if ids.dim() == 2 else rows[0]


@dataclass
class Settings:
    """ExLlamaV2Sampler.Settings, with its non-neutral defaults."""

    token_repetition_penalty: float = 1.025
    token_repetition_range: int = -1
    token_repetition_decay: int = 0
    token_frequency_penalty: float = 0.0
    token_presence_penalty: float = 0.0
    temperature: float = 0.8
    smoothing_factor: float = 0.0
    min_temp: float = 0.0
    max_temp: float = 0.0
    temp_exponent: float = 1.0
    top_k: int = 50
    top_p: float = 0.8
    top_a: float = 0.0
    min_p: float = 0.0
    tfs: float = 0.0
    typical: float = 0.0
    skew: float = 0.0
    temperature_last: bool = False
    mirostat: bool = False
    mirostat_tau: float = 1.5
    mirostat_eta: float = 0.1
    token_bias: Any = None
    cfg_scale: float | None = None
    dry_multiplier: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1

    def disallow_tokens(self, tokenizer: ExLlamaV2Tokenizer, tokens: list[int]) -> None:
        if self.token_bias is None:
            padding = -tokenizer.config.vocab_size % 32
            self.token_bias = torch.zeros((tokenizer.config.vocab_size + padding,), dtype=torch.float)
        self.token_bias[tokens] = float("-inf")


class ExLlamaV2Sampler:
    Settings = Settings


class ExLlamaV2DynamicJob(Recorded):
    def __init__(
        self, input_ids: torch.Tensor | list[torch.Tensor], max_new_tokens: int, min_new_tokens: int = 0,
        max_skips: int = 4, gen_settings: Settings | None = None, seed: int | None = None,
        stop_conditions: list[int | str] | None = None, decode_special_tokens: bool = False, **kwargs: Any,
    ) -> None:
        ids = input_ids if isinstance(input_ids, list) else [input_ids]
        assert all(t.device.type == "cpu" and t.dim() == 2 and t.shape[0] == 1 and t.shape[1] > 0 for t in ids)
        if any(not isinstance(c, (int, str)) for c in stop_conditions or []):
            raise ValueError("Unsupported type in stop_conditions")
        self.prompt = ids[0][0].tolist()
        self.max_new_tokens, self.gen_settings = max_new_tokens, gen_settings or Settings()
        self.decode_special_tokens = decode_special_tokens
        self.stops = list(stop_conditions or [])
        self.tokens: list[int] = []
        self.started, self.ranges = False, list[int]()
        self.standin.jobs.append(self)
        self.standin.record(
            "ExLlamaV2DynamicJob", max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, seed=seed,
            stop_conditions=self.stops, decode_special_tokens=decode_special_tokens,
        )

    def step(self) -> dict[str, Any]:
        base: dict[str, Any] = {"job": self, "stage": "streaming", "eos": False, "serial": id(self)}
        if not self.started:
            self.started = True
            return {**base, "stage": "started"}
        self.ranges.append(self.gen_settings.token_repetition_range)
        script = [ord(c) for c in self.standin.reply] + [self.standin.end_token]
        token = script[len(self.tokens)] if len(self.tokens) < len(script) else ord(".")
        bias = self.gen_settings.token_bias
        if bias is not None and bias[token] == float("-inf"):
            token = ord(".")  # the sampler takes the model's next choice
        if token in self.stops:
            return self._end(base, "stop_token", eos_triggering_token_id=token, eos_triggering_token_str="</s>")
        self.tokens.append(token)
        # Special tokens decode to their text only when asked; else to "" (exllamav2's id_to_piece list).
        text = (SPECIAL_PIECES[token] if self.decode_special_tokens else "") if token in SPECIAL_PIECES else chr(token)
        if text in self.stops:
            return self._end(base, "stop_string", eos_triggering_string=text)
        result = {**base, "text": text, "token_ids": torch.tensor([[token]])}
        return self._end(result, "max_new_tokens") if len(self.tokens) >= self.max_new_tokens else result

    def _end(self, result: dict[str, Any], reason: str, **extra: Any) -> dict[str, Any]:
        return {**result, **extra, "eos": True, "eos_reason": reason, "new_tokens": len(self.tokens),
                "prompt_tokens": len(self.prompt), "held": {}}


class ExLlamaV2DynamicGenerator(Recorded):
    def __init__(
        self, model: ExLlamaV2, cache: ExLlamaV2Cache, tokenizer: ExLlamaV2Tokenizer,
        max_batch_size: int | None = None, max_seq_len: int | None = None, max_chunk_size: int | None = None,
        max_q_size: int = 8, paged: bool = True, **kwargs: Any,
    ) -> None:
        cfg = model.config
        assert cache.batch_size == 1 and not isinstance(cache, ExLlamaV2Cache_8bit)
        assert cache.max_seq_len % 256 == 0, "Cache size must be a multiple of 256"
        max_chunk_size = max_chunk_size or cfg.max_input_len
        assert max_chunk_size <= cfg.max_input_len
        if paged:
            assert "flash_attn" in sys.modules and not cfg.no_flash_attn, "Paged attention required Flash Attention"
            assert max_chunk_size % 256 == 0
        if max_batch_size is not None:
            assert max_q_size * max_batch_size <= cfg.max_batch_size * cfg.max_input_len
        self.cache, self.running = cache, list[ExLlamaV2DynamicJob]()
        self.standin.record("ExLlamaV2DynamicGenerator", paged=paged, max_batch_size=max_batch_size,
                            max_chunk_size=max_chunk_size)

    def enqueue(self, job: ExLlamaV2DynamicJob) -> None:
        pages = math.ceil((len(job.prompt) + job.max_new_tokens) / 256)
        assert pages <= self.cache.max_seq_len // 256, "Job requires more pages than the cache holds"
        self.running.append(job)

    def iterate(self) -> list[dict[str, Any]]:
        if self.standin.fail_next_iterate:
            self.standin.fail_next_iterate = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered (stand-in)")
        if self.standin.stall:
            return []
        results = [job.step() for job in list(self.running)]
        self.running = [r["job"] for r in results if not r["eos"]]
        return results

    def cancel(self, job: ExLlamaV2DynamicJob) -> None:
        self.standin.record("generator.cancel")
        self.running.remove(job)


class ExLlamaV2DynamicGeneratorAsync(Recorded):
    """Same behaviour as exllamav2's asyncio wrapper, pitfalls included."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.generator = ExLlamaV2DynamicGenerator(*args, **kwargs)
        self.jobs: dict[ExLlamaV2DynamicJob, ExLlamaV2DynamicJobAsync] = {}
        self.condition = asyncio.Condition()
        self.iteration_task = asyncio.create_task(self._run_iteration())

    async def _run_iteration(self) -> None:
        try:
            while True:
                async with self.condition:
                    await self.condition.wait_for(lambda: len(self.jobs) > 0)
                for result in self.generator.iterate():
                    await self.jobs[result["job"]].put_result(result)
                    if result["eos"]:
                        del self.jobs[result["job"]]
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001  as exllamav2 does: any failure goes to every waiting job
            for async_job in self.jobs.values():
                await async_job.put_result(exc)

    def enqueue(self, job: ExLlamaV2DynamicJobAsync) -> None:
        assert job.job not in self.jobs
        self.jobs[job.job] = job
        self.generator.enqueue(job.job)
        asyncio.create_task(self._notify())

    async def _notify(self) -> None:
        async with self.condition:
            self.condition.notify_all()

    async def close(self) -> None:
        self.standin.record("generator.close")
        self.iteration_task.cancel()
        await self._notify()
        try:
            await self.iteration_task
        except asyncio.CancelledError:
            pass

    async def cancel(self, job: ExLlamaV2DynamicJobAsync) -> None:
        assert job.job in self.jobs
        self.generator.cancel(job.job)
        del self.jobs[job.job]


class ExLlamaV2DynamicJobAsync:
    cancelled = False

    def __init__(self, generator: ExLlamaV2DynamicGeneratorAsync, *args: Any, **kwargs: Any) -> None:
        self.generator = generator
        self.job = ExLlamaV2DynamicJob(*args, **kwargs)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.generator.enqueue(self)

    async def put_result(self, result: Any) -> None:
        await self.queue.put(result)

    async def __aiter__(self) -> Any:
        while not self.cancelled:
            result = await self.queue.get()
            if isinstance(result, Exception):
                raise result
            yield result
            if result["eos"]:
                break

    async def cancel(self) -> None:
        await self.generator.cancel(self)
        self.cancelled = True


def standin_package() -> tuple[ModuleType, ModuleType]:
    core = ModuleType("exllamav2")
    core.__spec__ = importlib.machinery.ModuleSpec("exllamav2", None, is_package=True)
    for core_class in (ExLlamaV2Config, ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6,
                       ExLlamaV2Cache_Q8, ExLlamaV2Cache_8bit, ExLlamaV2Tokenizer):
        setattr(core, core_class.__name__, core_class)
    generator = ModuleType("exllamav2.generator")
    generator.__spec__ = importlib.machinery.ModuleSpec("exllamav2.generator", None)
    for generator_class in (ExLlamaV2DynamicGeneratorAsync, ExLlamaV2DynamicJobAsync, ExLlamaV2Sampler):
        setattr(generator, generator_class.__name__, generator_class)
    core.generator = generator  # type: ignore[attr-defined]
    return core, generator


def gpus(monkeypatch: pytest.MonkeyPatch, *capabilities: tuple[int, int]) -> None:
    """The machine's GPUs, by compute capability."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[device or 0])


def compiled_extension() -> ModuleType:
    extension = ModuleType("exllamav2_ext")
    extension.__spec__ = importlib.machinery.ModuleSpec("exllamav2_ext", None)
    return extension


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    state = StandIn()
    core, generator = standin_package()
    monkeypatch.setattr(Recorded, "standin", state, raising=False)
    monkeypatch.setitem(sys.modules, "exllamav2", core)
    monkeypatch.setitem(sys.modules, "exllamav2.generator", generator)
    monkeypatch.setitem(sys.modules, "exllamav2_ext", compiled_extension())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpus(monkeypatch, (8, 6))  # one Ampere GPU
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: state.record("torch.cuda.empty_cache"))
    monkeypatch.setattr(gc, "collect", lambda *args: state.record_returning("gc.collect", 0))
    return state


# Model folders -------------------------------------------------------------------------------


def model_folder(tmp_path: Path, name: str = "Llama-3.1-8B-exl2", **config: Any) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    hf_config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                 "bos_token_id": 128000, "eos_token_id": LLAMA31_EOS, **config}
    (folder / "config.json").write_text(json.dumps(hf_config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return folder


def loaded_engine(folder: Path, **options: Any) -> tuple[ExLlamaV2Engine, list[tuple[int, int]]]:
    engine = ExLlamaV2Engine(folder, LoadOptions(**options))
    progress = list(engine.load_gen())
    return engine, progress


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on a fresh loop; a generator that stops answering fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, timeout=5))


def generate(engine: ExLlamaV2Engine, prompt: list[int], **params: Any) -> list[GenerationChunk]:
    async def collect() -> list[GenerationChunk]:
        return [chunk async for chunk in engine.generate(prompt, SamplingParams(**{"max_tokens": 100, **params}))]

    return run(collect())


# Folder checks and the import guard (real) ---------------------------------------------------


def test_a_folder_without_config_json_is_refused_before_exllamav2_is_imported(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match="config.json"):
        ExLlamaV2Engine(folder, LoadOptions())
    assert "exllamav2" not in sys.modules


def test_a_broken_config_json_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="Failed to load config.json"):
        ExLlamaV2Engine(folder, LoadOptions())


def test_an_architecture_exllamav2_would_silently_load_as_llama_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, architectures=["Gemma3ForCausalLM"])
    with pytest.raises(ModelFolderError, match="does not support the architecture Gemma3ForCausalLM"):
        ExLlamaV2Engine(folder, LoadOptions())
    assert "exllamav2" not in sys.modules


def test_llava_is_accepted_only_with_a_pixtral_vision_tower(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError):
        ExLlamaV2Engine(model_folder(tmp_path, "a", architectures=["LlavaForConditionalGeneration"]), LoadOptions())
    pixtral = model_folder(
        tmp_path, "b", architectures=["LlavaForConditionalGeneration"], vision_config={"model_type": "pixtral"}
    )
    assert ExLlamaV2Engine(pixtral, LoadOptions()).model_name == "b"


def test_an_exl3_folder_is_sent_to_exllamav3(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, quantization_config={"quant_method": "exl3"})
    with pytest.raises(ModelFolderError, match="exllamav3"):
        ExLlamaV2Engine(folder, LoadOptions())


def test_a_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=r"no \*\.safetensors"):
        ExLlamaV2Engine(folder, LoadOptions())


def test_a_folder_without_tokenizer_json_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match="no tokenizer.json"):
        ExLlamaV2Engine(folder, LoadOptions())


def test_an_fp8_cache_is_refused_because_the_dynamic_generator_cannot_use_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="8bit"):
        ExLlamaV2Engine(model_folder(tmp_path), LoadOptions(cache_mode="8bit"))


def test_without_cuda_the_import_says_a_gpu_is_needed_and_imports_nothing() -> None:
    assert not torch.cuda.is_available()
    with pytest.raises(EngineUnavailableError, match="needs an NVIDIA GPU with CUDA.*backend 'torch'"):
        import_exllamav2()
    assert "exllamav2" not in sys.modules


def test_without_the_package_the_import_points_to_the_gpu_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(EngineUnavailableError, match="exllamav2 is not installed.*'gpu'"):
        import_exllamav2()


class Installed(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An installed exllamav2 (and, if `extension`, its compiled extension) whose import runs `on_import`.

    Importing exllamav2.model first sets torch to one thread for the whole process, as the real one does.
    """

    def __init__(self, extension: bool, on_import: Exception | None = None) -> None:
        self.names = {"exllamav2", "exllamav2.generator"} | ({"exllamav2_ext"} if extension else set())
        self.on_import = on_import
        self.imported: list[str] = []

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self, is_package=name == "exllamav2") if name in self.names else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        self.imported.append(module.__name__)
        torch.set_num_threads(1)
        if self.on_import is not None:
            raise self.on_import


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Put an `Installed` exllamav2 on the import path; whatever it imported is forgotten afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    threads = torch.get_num_threads()
    finders: list[Installed] = []

    def put(extension: bool, on_import: Exception | None = None) -> Installed:
        finder = Installed(extension, on_import)
        finders.append(finder)
        monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
        return finder

    yield put
    for name in ("exllamav2", "exllamav2.generator", "exllamav2_ext"):
        sys.modules.pop(name, None)
    torch.set_num_threads(threads)


def test_an_extension_that_cannot_load_becomes_a_readable_error(install: Any) -> None:
    install(extension=True, on_import=OSError("libcudart.so.12: cannot open shared object file"))
    threads = torch.get_num_threads()
    with pytest.raises(EngineUnavailableError, match="OSError: libcudart.so.12.*built for this torch and CUDA"):
        import_exllamav2()
    assert "exllamav2" not in sys.modules
    assert torch.get_num_threads() == threads


def test_a_half_built_extension_becomes_a_readable_error_too(install: Any) -> None:
    # exllamav2 swallows an extension import error other than "undefined symbol", then uses the unbound name.
    install(extension=True, on_import=NameError("name 'exllamav2_ext' is not defined"))
    with pytest.raises(EngineUnavailableError, match="could not be loaded \\(NameError: name 'exllamav2_ext'"):
        import_exllamav2()


def test_without_the_compiled_extension_no_load_compiles_it(install: Any) -> None:
    finder = install(extension=False)
    with pytest.raises(EngineUnavailableError, match="without its compiled CUDA extension.*'GPU install'"):
        import_exllamav2()
    assert finder.imported == []  # importing exllamav2 would have started the compiler


def test_importing_exllamav2_gives_torch_its_threads_back(install: Any) -> None:
    finder = install(extension=True)
    threads = torch.get_num_threads()
    assert threads > 1 or pytest.skip("needs a torch with more than one thread")
    modules = import_exllamav2()
    assert finder.imported == ["exllamav2", "exllamav2.generator"]
    assert (modules.core.__name__, modules.generator.__name__) == ("exllamav2", "exllamav2.generator")
    assert torch.get_num_threads() == threads


# Loading (stand-in library) ------------------------------------------------------------------


def test_loading_follows_exllamav2s_order_and_reports_modules_really_loaded(tmp_path: Path, standin: StandIn) -> None:
    engine = ExLlamaV2Engine(model_folder(tmp_path), LoadOptions())
    progress = []
    for k, n in engine.load_gen():
        progress.append((k, n))
        assert standin.calls[-1][0] != "ExLlamaV2Tokenizer"
    assert progress == [(k, 7) for k in range(1, 8)]
    assert standin.names()[:8] == [
        "ExLlamaV2Config", "prepare", "arch_compat_overrides", "ExLlamaV2", "cache", "load_autosplit_gen",
        "forward", "ExLlamaV2Tokenizer",
    ]
    assert standin.details("ExLlamaV2Config") == {"model_dir": None}
    assert standin.details("arch_compat_overrides") == {
        "quiet": False, "warn_only": False, "max_seq_len": 4096, "max_input_len": 2048,
        "max_attention_size": 2048**2, "max_output_len": 16, "scale_pos_emb": 1.0, "scale_alpha_value": 1.0,
    }
    assert standin.details("cache") == {
        "kind": "ExLlamaV2Cache", "max_seq_len": 4096, "lazy": True, "modules_loaded": 0
    }
    assert standin.details("load_autosplit_gen") == {"reserve_vram": [96 * 1024**2], "last_id_only": True}
    assert standin.details("forward") == {"shape": (1, 2048), "preprocess_only": True}
    assert "ExLlamaV2DynamicGenerator" not in standin.names()  # needs a running loop: built on first use


def test_progress_comes_after_each_module_is_in_memory(tmp_path: Path, standin: StandIn) -> None:
    engine = ExLlamaV2Engine(model_folder(tmp_path), LoadOptions())
    loader = engine.load_gen()
    for expected in (1, 2, 3):
        k, n = next(loader)
        assert (k, n, standin.details("ExLlamaV2")["model"].loaded) == (expected, 7, expected)
    loader.close()
    assert "model.unload" in standin.names()  # an abandoned load gives the memory back


def test_a_manual_split_loads_the_model_before_creating_the_cache(
    tmp_path: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(monkeypatch, (8, 6), (8, 9))
    _, progress = loaded_engine(model_folder(tmp_path), gpu_split_auto=False, gpu_split=[20.0, 24.0])
    assert standin.details("load_gen") == {"gpu_split": [20.0, 24.0]}
    assert standin.details("cache") == {
        "kind": "ExLlamaV2Cache", "max_seq_len": 4096, "lazy": False, "modules_loaded": 7
    }
    assert standin.names().index("load_gen") < standin.names().index("cache")
    assert progress[-1] == (7, 7)


def test_cache_size_is_rounded_up_to_whole_pages_and_caps_the_context(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path), cache_size=1000, chunk_size=300, cache_mode="q4")
    assert standin.details("cache")["max_seq_len"] == 1024
    assert standin.details("cache")["kind"] == "ExLlamaV2Cache_Q4"
    assert standin.details("arch_compat_overrides")["max_seq_len"] == 1024
    assert standin.details("arch_compat_overrides")["max_input_len"] == 512
    assert engine.max_seq_len == 1024


def test_overrides_reach_the_config_before_arch_compat_overrides(tmp_path: Path, standin: StandIn) -> None:
    loaded_engine(model_folder(tmp_path), max_seq_len=8192, rope_scale=2.0, rope_alpha=2.5)
    seen = standin.details("arch_compat_overrides")
    assert (seen["max_seq_len"], seen["scale_pos_emb"], seen["scale_alpha_value"]) == (8192, 2.0, 2.5)
    assert standin.details("cache")["max_seq_len"] == 8192


def test_without_flash_attn_the_generator_runs_unpaged_one_job_at_a_time(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path), cache_size=5000)
    generate(engine, [5, 6, 7], max_tokens=3)
    assert standin.details("ExLlamaV2DynamicGenerator") == {"paged": False, "max_batch_size": 1, "max_chunk_size": 2048}
    assert engine.card_parameters() == {
        "max_seq_len": 4096, "cache_size": 5120, "cache_mode": "FP16", "rope_scale": 1.0, "rope_alpha": 1.0,
        "max_batch_size": 1, "chunk_size": 2048, "prompt_template": "from_tokenizer_config", "use_vision": False,
    }


def test_with_flash_attn_2_5_7_the_generator_is_paged(
    tmp_path: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    flash_attn = ModuleType("flash_attn")
    flash_attn.__version__ = "2.6.3"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn)
    engine, _ = loaded_engine(model_folder(tmp_path))
    generate(engine, [5, 6, 7], max_tokens=3)
    assert standin.details("ExLlamaV2DynamicGenerator") == {
        "paged": True, "max_batch_size": 256, "max_chunk_size": 2048
    }


def test_autosplit_leaves_a_reserve_on_every_gpu(
    tmp_path: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus(monkeypatch, (8, 6), (8, 6), (8, 6))
    loaded_engine(model_folder(tmp_path, "a"))
    assert standin.details("load_autosplit_gen")["reserve_vram"] == [96 * 1024**2, 0, 0]
    standin.calls.clear()
    loaded_engine(model_folder(tmp_path, "b"), autosplit_reserve=[512, 256.5, 128, 64])
    assert standin.details("load_autosplit_gen")["reserve_vram"] == [512 * 1024**2, 256.5 * 1024**2, 128 * 1024**2]


def test_flash_attn_is_switched_off_when_a_gpu_in_use_predates_ampere(
    tmp_path: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    flash_attn = ModuleType("flash_attn")
    flash_attn.__version__ = "2.6.3"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn)
    gpus(monkeypatch, (8, 6), (7, 5))  # an RTX 3090 and an RTX 2080 Ti
    engine, _ = loaded_engine(model_folder(tmp_path, "a"))
    generate(engine, [5, 6, 7], max_tokens=3)
    assert standin.details("ExLlamaV2")["no_flash_attn"] is True  # before any module loads
    assert standin.details("ExLlamaV2DynamicGenerator")["paged"] is False
    assert engine.card_parameters()["max_batch_size"] == 1
    standin.calls.clear()
    loaded_engine(model_folder(tmp_path, "b"), gpu_split_auto=False, gpu_split=[24.0])  # the 3090 only
    assert standin.details("ExLlamaV2")["no_flash_attn"] is False


def test_the_cache_holds_4096_tokens_unless_told_otherwise(tmp_path: Path, standin: StandIn) -> None:
    folder = model_folder(tmp_path, max_position_embeddings=131072)  # Llama 3.1: 16 GiB of FP16 cache
    engine = ExLlamaV2Engine(folder, LoadOptions())
    assert (engine.max_seq_len, engine.cache_size) == (4096, 4096)  # the estimate before the load too
    list(engine.load_gen())
    assert standin.details("cache")["max_seq_len"] == 4096
    assert (engine.card_parameters()["max_seq_len"], engine.card_parameters()["cache_size"]) == (4096, 4096)
    for options, expected in [({"max_seq_len": 32768}, (32768, 32768)), ({"cache_size": 16000}, (16128, 16128)),
                              ({"max_seq_len": 32768, "cache_size": 8192}, (8192, 8192))]:
        standin.calls.clear()
        engine, _ = loaded_engine(folder, **options)
        assert (engine.max_seq_len, standin.details("cache")["max_seq_len"]) == expected, options


def test_a_model_with_a_short_context_keeps_it(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path, max_position_embeddings=2048))
    assert (engine.max_seq_len, standin.details("cache")["max_seq_len"]) == (2048, 2048)


def test_a_load_that_fails_gives_the_memory_back(tmp_path: Path, standin: StandIn) -> None:
    standin.reply = "OOM"
    with pytest.raises(RuntimeError, match="out of memory"):
        loaded_engine(model_folder(tmp_path))
    assert standin.names()[-3:] == ["model.unload", "gc.collect", "torch.cuda.empty_cache"]


# Tokens and chat templates -------------------------------------------------------------------


def test_encode_and_decode_use_the_first_row(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    assert engine.encode("Hi") == [1, ord("H"), ord("i")]
    assert engine.decode([1, ord("H"), ord("i")]) == "Hi"
    assert standin.details("encode") == {"add_bos": True, "encode_special_tokens": True}


def test_chat_is_rendered_from_tokenizer_config_without_a_second_bos(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    text = engine.render_chat([{"role": "user", "content": "Hi"}])
    assert text == "<user>Hi\n<assistant>"


def test_chat_template_jinja_comes_before_tokenizer_config(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    (folder / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    template = find_chat_template(folder, templates_dir=None)
    assert template is not None and template.name == "chat_template"


def test_a_named_template_is_picked_from_a_list_form_tokenizer_config(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    entries = [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": entries}))
    assert find_chat_template(folder, "tool_use", templates_dir=None) == find_chat_template(folder, "tool_use")
    template = find_chat_template(folder, "tool_use", templates_dir=None)
    assert template is not None and (template.name, template.source) == ("tool_use", "B")
    first = find_chat_template(folder, templates_dir=None)
    assert first is not None and first.source == "A"


def test_raise_exception_in_a_template_reaches_the_caller_as_a_template_error(
    tmp_path: Path, standin: StandIn
) -> None:
    folder = model_folder(tmp_path)
    (folder / "chat_template.jinja").write_text("{{ raise_exception('Only user and assistant roles') }}")
    engine, _ = loaded_engine(folder)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        engine.render_chat([{"role": "system", "content": "x"}])
    assert engine.card_parameters()["prompt_template"] == "chat_template"


# Generation (stand-in library) ---------------------------------------------------------------


def test_generation_stops_on_any_eos_id_of_config_and_generation_config(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    chunks = generate(engine, [5, 6, 7])
    assert "".join(c.text for c in chunks) == "Hello world"
    assert standin.details("ExLlamaV2DynamicJob")["stop_conditions"] == LLAMA31_EOS
    last = chunks[-1]
    assert (last.finish_reason, last.stop_str, last.prompt_tokens, last.completion_tokens) == ("stop", None, 3, 11)
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_a_stop_string_is_reported_as_stop_str(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    chunks = generate(engine, [5], stop=[" ", ""], stop_token_ids=[42])
    assert standin.details("ExLlamaV2DynamicJob")["stop_conditions"] == [" ", 42, *LLAMA31_EOS]
    assert "".join(c.text for c in chunks) == "Hello"
    assert (chunks[-1].finish_reason, chunks[-1].stop_str) == ("stop", " ")


def test_running_out_of_tokens_finishes_with_length(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    chunks = generate(engine, [5], max_tokens=4)
    assert "".join(c.text for c in chunks) == "Hell"
    assert (chunks[-1].finish_reason, chunks[-1].token_count, chunks[-1].completion_tokens) == ("length", 4, 4)


def test_ban_eos_token_disallows_every_eos_id_in_the_sampler(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    chunks = generate(engine, [5], max_tokens=14, ban_eos_token=True)
    assert standin.details("ExLlamaV2DynamicJob")["stop_conditions"] == []
    bias = standin.jobs[0].gen_settings.token_bias
    assert bias.shape == (128256,) and torch.isinf(bias).nonzero().flatten().tolist() == LLAMA31_EOS
    assert "".join(c.text for c in chunks) == "Hello world..."  # the model wanted to end after "world"
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 14
    assert not set(standin.jobs[0].tokens) & set(LLAMA31_EOS)


def test_a_ban_leaves_out_eos_ids_past_the_vocabulary(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path, vocab_size=128004))
    generate(engine, [5], max_tokens=3, ban_eos_token=True)
    bias = standin.jobs[0].gen_settings.token_bias
    assert torch.isinf(bias).nonzero().flatten().tolist() == [128001]


def test_without_a_ban_the_sampler_is_left_unbiased(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    generate(engine, [5], max_tokens=3)
    assert standin.jobs[0].gen_settings.token_bias is None


def test_a_stop_string_that_is_a_special_token_ends_the_answer(tmp_path: Path, standin: StandIn) -> None:
    # A Llama 3 model whose settings name only <|end_of_text|>: its chat turns end with <|eot_id|>.
    folder = model_folder(tmp_path, eos_token_id=128001)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 128001}))
    engine, _ = loaded_engine(folder)
    chunks = generate(engine, [5], stop=["<|eot_id|>"])
    assert standin.details("ExLlamaV2DynamicJob")["decode_special_tokens"] is True
    assert "".join(c.text for c in chunks) == "Hello world"
    assert (chunks[-1].finish_reason, chunks[-1].stop_str) == ("stop", "<|eot_id|>")


def test_every_sampler_setting_comes_from_the_request(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    generate(engine, [5], temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
             penalty_range=64, seed=1234, min_tokens=2)
    assert dataclasses.asdict(standin.jobs[0].gen_settings) == {
        "temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "token_repetition_penalty": 1.1,
        "token_repetition_range": 64, "token_repetition_decay": 0, "token_frequency_penalty": 0.0,
        "token_presence_penalty": 0.0, "top_a": 0.0, "tfs": 0.0, "typical": 0.0, "skew": 0.0,
        "smoothing_factor": 0.0, "temperature_last": False, "min_temp": 0.0, "max_temp": 0.0,
        "temp_exponent": 1.0, "mirostat": False, "mirostat_tau": 1.5, "mirostat_eta": 0.1, "token_bias": None,
        "cfg_scale": None, "dry_multiplier": 0.0, "xtc_probability": 0.0, "xtc_threshold": 0.1,
    }
    assert {k: standin.details("ExLlamaV2DynamicJob")[k] for k in ("seed", "min_new_tokens")} == {
        "seed": 1234, "min_new_tokens": 2
    }


def test_neutral_request_settings_replace_the_librarys_defaults(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    generate(engine, [5])
    settings = standin.jobs[0].gen_settings
    assert (settings.temperature, settings.top_k, settings.top_p, settings.token_repetition_penalty) == (
        1.0, 0, 1.0, 1.0
    )


def test_a_temperature_below_0_01_samples_greedily(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    generate(engine, [5], temperature=0.0, top_k=40)
    settings = standin.jobs[0].gen_settings
    assert (settings.temperature, settings.top_k, settings.top_p) == (1.0, 1, 0.0)


def test_frequency_penalty_counts_only_the_answer_not_the_prompt(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    generate(engine, [5, 6, 7, 8], frequency_penalty=0.5, max_tokens=5)
    assert standin.jobs[0].ranges == [0, 1, 2, 3, 4]


def test_a_prompt_that_does_not_fit_is_refused_before_any_job_exists(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path), max_seq_len=512)
    with pytest.raises(ContextLengthError) as error:
        generate(engine, [5] * 512)
    assert (error.value.prompt_tokens, error.value.max_seq_len) == (512, 512)
    assert "ExLlamaV2DynamicJob" not in standin.names()


def test_max_tokens_is_clamped_to_the_room_left_in_the_context(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path), max_seq_len=512)
    chunks = generate(engine, [5] * 508, max_tokens=1000)
    assert standin.details("ExLlamaV2DynamicJob")["max_new_tokens"] == 4
    assert chunks[-1].finish_reason == "length"


def test_closing_the_stream_early_cancels_the_job(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))

    async def first_chunk_then_another_answer() -> tuple[str, str]:
        stream = engine.generate([5], SamplingParams(max_tokens=100))
        first = await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        again = [c.text async for c in engine.generate([5], SamplingParams(max_tokens=100))]
        return first.text, "".join(again)

    assert run(first_chunk_then_another_answer()) == ("H", "Hello world")
    assert standin.names().count("generator.cancel") == 1
    assert standin.names().count("ExLlamaV2DynamicGenerator") == 1


def test_a_finished_job_is_not_cancelled_again(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    generate(engine, [5])
    assert "generator.cancel" not in standin.names()


def test_a_generator_whose_iterate_raised_is_replaced(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))

    async def fail_then_answer() -> str:
        standin.fail_next_iterate = True
        with pytest.raises(RuntimeError, match="illegal memory access"):
            [c async for c in engine.generate([5], SamplingParams(max_tokens=100))]
        return "".join([c.text async for c in engine.generate([5], SamplingParams(max_tokens=100))])

    assert run(fail_then_answer()) == "Hello world"
    assert standin.names().count("ExLlamaV2DynamicGenerator") == 2


# Unloading (stand-in library) ----------------------------------------------------------------


def test_unload_stops_running_jobs_then_follows_exllamav2s_order(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))

    async def unload_while_answering() -> None:
        stream = engine.generate([5], SamplingParams(max_tokens=100))
        await anext(stream)
        standin.stall = True
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.unload)
        with pytest.raises(GenerationAbortedError, match="unloaded while this answer"):
            await waiting

    run(unload_while_answering())
    tail = standin.names()[standin.names().index("generator.cancel"):]
    assert tail == ["generator.cancel", "model.unload", "generator.close", "gc.collect", "torch.cuda.empty_cache"]
    with pytest.raises(RuntimeError, match="not loaded"):
        engine.encode("Hi")


def test_unload_without_a_generator_skips_closing_it(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))
    engine.unload()
    engine.unload()
    assert standin.names()[-5:] == ["model.unload", "gc.collect", "torch.cuda.empty_cache", "gc.collect",
                                    "torch.cuda.empty_cache"]


def test_unload_called_on_the_loops_own_thread_still_stops_running_jobs(tmp_path: Path, standin: StandIn) -> None:
    engine, _ = loaded_engine(model_folder(tmp_path))

    async def unload_inline() -> None:
        stream = engine.generate([5], SamplingParams(max_tokens=100))
        await anext(stream)
        standin.stall = True
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        engine.unload()
        with pytest.raises(GenerationAbortedError):
            await waiting

    run(unload_inline())
    assert "generator.close" not in standin.names()  # awaiting it here would deadlock; its task is cancelled
    assert "generator.cancel" not in standin.names()
    assert standin.names()[-3:] == ["model.unload", "gc.collect", "torch.cuda.empty_cache"]
