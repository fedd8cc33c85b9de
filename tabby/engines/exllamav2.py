"""The GPU engine: EXL2 and FP16 model folders on exllamav2 0.3.x.

exllamav2 builds or loads its CUDA extension at import time (even `ExLlamaV2Config` needs it),
so nothing here imports it, or torch, until a load starts: `import_exllamav2()` is the only door.
The checks made before that door live in `exllamav2_support`; what the engine hands the generator
and takes back from it (sampler settings, results, cancelled jobs) in `exllamav2_jobs`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

from tabby.engines.base import (
    ContextLengthError,
    GenerationChunk,
    LoadOptions,
    ModelFolderError,
    SamplingParams,
)
from tabby.engines.exllamav2_jobs import (
    GenerationAbortedError,
    cancel_jobs,
    halt_jobs,
    narrows_penalty_range,
    result_chunk,
    run_on_loop,
    sampler_settings,
    stop_conditions,
    token_count,
    tokenizer_token,
)
from tabby.engines.exllamav2_support import (
    CACHE_CLASSES,
    DEFAULT_CHUNK_SIZE,
    MAX_Q_SIZE,
    PAGE_SIZE,
    ExLlamaV2Modules,
    autosplit_reserve_bytes,
    cache_tokens,
    check_cache_mode,
    check_model_folder,
    eos_token_ids,
    flash_attn_hardware,
    flash_attn_supports_paging,
    gpus_in_use,
    import_exllamav2,
    native_max_seq_len,
    round_up_to_page,
)
from tabby.heap import collect_all
from tabby.templating import (
    ChatTemplateError,
    compile_chat_template,
    find_chat_template,
    read_tokenizer_config,
    render_chat_template,
)


def _report_progress(module: int, modules: int) -> Iterator[tuple[int, int]]:
    # exllamav2 runs this before module `module` loads, then once more as (n, n): k modules are loaded.
    yield module, modules


class ExLlamaV2Engine:
    """One EXL2/FP16 model on exllamav2's asyncio dynamic generator."""

    def __init__(self, model_dir: Path, options: LoadOptions) -> None:
        self.model_dir = model_dir
        self.model_name = model_dir.name
        self.options = options
        self.hf_config = check_model_folder(model_dir)
        self.cache_mode = check_cache_mode(options.cache_mode)
        # Estimates until load_gen() reads the real values from exllamav2's config.
        native = native_max_seq_len(self.hf_config)
        self.cache_size = cache_tokens(options.max_seq_len, options.cache_size, native)
        self.max_seq_len = min(options.max_seq_len or native, self.cache_size)
        self.rope_scale = options.rope_scale
        self.rope_alpha = options.rope_alpha
        self.max_batch_size = 1
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.paged = False
        self.prompt_template: str | None = None
        self.eos_ids: list[int] = []
        self.add_bos_token = True
        self.devices: list[int] = []
        self._lib: ExLlamaV2Modules | None = None
        self._config: Any = None
        self._model: Any = None
        self._cache: Any = None
        self._tokenizer: Any = None
        self._template: Any = None
        self._generator: Any = None
        self._generator_loop: asyncio.AbstractEventLoop | None = None
        self._jobs: set[Any] = set()

    # Loading

    def load_gen(self) -> Generator[tuple[int, int], None, None]:
        try:
            self._lib = import_exllamav2()
            self._config = self._prepare_config()
            self._model = self._lib.core.ExLlamaV2(self._config)
            yield from self._throttled(self._load_weights())
            self._check_vram()
            self._load_tokenizer()
            self._plan_generator()
        except BaseException:
            self.unload()
            raise

    def _prepare_config(self) -> Any:
        assert self._lib is not None
        cfg = self._lib.core.ExLlamaV2Config()
        cfg.model_dir = str(self.model_dir)
        try:
            cfg.prepare()
        except (AssertionError, KeyError, TypeError, ValueError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise ModelFolderError(f"exllamav2 could not read the model folder {self.model_name} ({reason}).") from None
        self._apply_overrides(cfg)
        cfg.arch_compat_overrides(quiet=False, warn_only=False)
        self.devices = gpus_in_use(self.options.gpu_split_auto is not False, self.options.gpu_split)
        if not flash_attn_hardware(self.devices):
            # exllamav2 turns flash-attn on at import whenever it is installed, even for GPUs it cannot run on.
            cfg.no_flash_attn = True
        return cfg

    def _apply_overrides(self, cfg: Any) -> None:
        """The load options; prepare() has just overwritten max_seq_len with the model's own."""
        self.cache_size = cache_tokens(self.options.max_seq_len, self.options.cache_size, cfg.max_seq_len)
        cfg.max_seq_len = min(self.options.max_seq_len or cfg.max_seq_len, self.cache_size)
        if self.options.rope_scale is not None:
            cfg.scale_pos_emb = self.options.rope_scale
        if self.options.rope_alpha is not None:
            cfg.scale_alpha_value = self.options.rope_alpha
        self.rope_scale, self.rope_alpha = cfg.scale_pos_emb, cfg.scale_alpha_value
        chunk_size = min(round_up_to_page(self.options.chunk_size or DEFAULT_CHUNK_SIZE), cfg.max_seq_len)
        cfg.max_input_len = chunk_size
        cfg.max_attention_size = chunk_size**2
        cfg.max_output_len = 16
        self.max_seq_len = cfg.max_seq_len

    def _new_cache(self, lazy: bool) -> Any:
        assert self._lib is not None
        cache_class = getattr(self._lib.core, CACHE_CLASSES[self.cache_mode])
        return cache_class(self._model, batch_size=1, max_seq_len=self.cache_size, lazy=lazy)

    def _load_weights(self) -> Iterator[tuple[int, int]]:
        if self.options.gpu_split_auto is not False:
            # Autosplit places the cache as it fills each GPU, so the cache must exist first, unallocated.
            self._cache = self._new_cache(lazy=True)
            reserve = autosplit_reserve_bytes(self.options.autosplit_reserve, len(self.devices))
            yield from self._model.load_autosplit_gen(
                self._cache, reserve_vram=reserve, last_id_only=True, callback_gen=_report_progress
            )
        else:
            # A manual split decides the devices; the cache follows the model's cache_map afterwards.
            yield from self._model.load_gen(gpu_split=self.options.gpu_split, callback_gen=_report_progress)
            self._cache = self._new_cache(lazy=False)

    def _throttled(self, progress: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """Drop the (0, n) sent before anything loads; pace modules when a disk speed is simulated."""
        per_module_bytes = 0.0
        for k, n in progress:
            if k == 0:
                continue
            if self.options.load_throttle_mbps > 0:
                per_module_bytes = per_module_bytes or self._weights_bytes() / n
                time.sleep(per_module_bytes / (self.options.load_throttle_mbps * 1_000_000))
            yield k, n

    def _weights_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.model_dir.glob("*.safetensors"))

    def _check_vram(self) -> None:
        import torch

        # One full-chunk pass now, so a cache that does not fit fails the load, not the first request.
        input_ids = torch.zeros((1, self._config.max_input_len), dtype=torch.long)
        self._model.forward(input_ids, cache=self._cache, preprocess_only=True)

    def _load_tokenizer(self) -> None:
        assert self._lib is not None
        self._tokenizer = self._lib.core.ExLlamaV2Tokenizer(self._config)
        generation_config = getattr(self._config, "generation_config", None)
        self.eos_ids = eos_token_ids(self.hf_config, generation_config, self._tokenizer.eos_token_id)
        self.add_bos_token = read_tokenizer_config(self.model_dir).get("add_bos_token", True) is not False
        template = find_chat_template(self.model_dir, self.options.prompt_template)
        if template is not None:
            self._template = compile_chat_template(template)
            self.prompt_template = template.name

    def _plan_generator(self) -> None:
        """Decide the generator's shape now (the card shows it) and build it later inside the loop."""
        # load_autosplit may have clamped max_input_len to max_seq_len; paged chunks must be whole pages.
        paged_chunk = self._config.max_input_len // PAGE_SIZE * PAGE_SIZE
        self.paged = paged_chunk > 0 and not self._config.no_flash_attn and flash_attn_supports_paging(self.devices)
        self.chunk_size = paged_chunk if self.paged else self._config.max_input_len
        # Unpaged, one page spans the whole cache: only one job can run at a time.
        self.max_batch_size = self._config.max_input_len // MAX_Q_SIZE if self.paged else 1

    # Tokens and templates

    def encode(self, text: str, add_bos: bool = True, encode_special_tokens: bool = True) -> list[int]:
        ids = self._loaded_tokenizer().encode(
            text, add_bos=add_bos and self.add_bos_token, encode_special_tokens=encode_special_tokens
        )
        return [int(i) for i in ids[0].tolist()]

    def decode(self, ids: list[int], decode_special_tokens: bool = True) -> str:
        import torch

        if not ids:
            return ""
        # A 2-D tensor decodes to one string per row.
        texts = self._loaded_tokenizer().decode(
            torch.tensor([ids], dtype=torch.long), decode_special_tokens=decode_special_tokens
        )
        return str(texts[0])

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template_vars: dict[str, Any] | None = None,
    ) -> str:
        tokenizer = self._loaded_tokenizer()
        if self._template is None:
            raise ChatTemplateError(
                f"{self.model_name} has no chat template; set prompt_template when loading it, or use completions."
            )
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        tokens = {name: tokenizer_token(tokenizer, name) for name in names}
        text = render_chat_template(self._template, messages, add_generation_prompt, tokens, template_vars)
        # encode() adds the BOS itself when the tokenizer wants one; a second one would change the answer.
        bos = tokens["bos_token"]
        if self.add_bos_token and bos and text.startswith(bos):
            text = text[len(bos):]
        return text

    def _loaded_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise RuntimeError(f"{self.model_name} is not loaded.")
        return self._tokenizer

    # Generation

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        max_new_tokens = self._max_new_tokens(len(prompt_ids), params.max_tokens)
        generator = self._ensure_generator()
        assert self._lib is not None
        banned = self.eos_ids if params.ban_eos_token else []
        settings = sampler_settings(self._lib.generator, params, self._tokenizer, banned)
        job = self._start_job(generator, prompt_ids, params, settings, max_new_tokens)
        self._jobs.add(job)
        narrow_range = narrows_penalty_range(params)
        finished, generated = False, 0
        try:
            async for result in job:
                if result.get("stage") != "streaming":
                    continue
                generated += token_count(result)
                if narrow_range:
                    settings.token_repetition_range = generated
                finished = bool(result["eos"])
                yield result_chunk(result, generated)
            if not finished:
                raise GenerationAbortedError()
        finally:
            self._jobs.discard(job)
            if not finished:
                await self._cancel_job(generator, job)

    def _max_new_tokens(self, prompt_tokens: int, requested: int) -> int:
        """Clamp to the context: an enqueue that asserts leaves the generator stuck for good."""
        if self._generator_parts_missing():
            raise RuntimeError(f"{self.model_name} is not loaded.")
        if prompt_tokens == 0:
            raise ValueError("The prompt is empty; send at least one token.")
        if prompt_tokens >= self.max_seq_len:
            raise ContextLengthError(prompt_tokens, self.max_seq_len)
        room = self.max_seq_len - prompt_tokens
        return min(requested, room) if requested > 0 else room

    def _generator_parts_missing(self) -> bool:
        return self._lib is None or self._model is None or self._cache is None or self._tokenizer is None

    def _ensure_generator(self) -> Any:
        loop = asyncio.get_running_loop()
        generator = self._generator
        # iterate() raising ends the background task: that generator never runs another job.
        if generator is None or generator.iteration_task.done() or self._generator_loop is not loop:
            assert self._lib is not None
            generator = self._lib.generator.ExLlamaV2DynamicGeneratorAsync(
                model=self._model, cache=self._cache, tokenizer=self._tokenizer,
                max_batch_size=self.max_batch_size, max_chunk_size=self.chunk_size, paged=self.paged,
            )
            self._generator, self._generator_loop = generator, loop
        return generator

    def _start_job(
        self, generator: Any, prompt_ids: list[int], params: SamplingParams, settings: Any, max_new_tokens: int
    ) -> Any:
        import torch

        assert self._lib is not None
        try:
            # The job enqueues itself in its constructor.
            return self._lib.generator.ExLlamaV2DynamicJobAsync(
                generator,
                input_ids=torch.tensor([prompt_ids], dtype=torch.long),
                max_new_tokens=max_new_tokens,
                min_new_tokens=min(params.min_tokens, max_new_tokens),
                gen_settings=settings,
                seed=params.seed,
                stop_conditions=stop_conditions(params, self.eos_ids),
                decode_special_tokens=True,  # else a stop string such as "<|eot_id|>" never matches
            )
        except BaseException:
            # The job registers itself before enqueue() runs, so a failed enqueue leaves an entry that
            # keeps the generator iterating forever. Every other registered job is one of ours.
            for key, async_job in list(generator.jobs.items()):
                if async_job not in self._jobs:
                    del generator.jobs[key]
            raise

    async def _cancel_job(self, generator: Any, job: Any) -> None:
        # cancel() asserts the job is still registered; finished jobs are gone, and a dead or
        # replaced generator has nobody left to tell.
        if generator is self._generator and not generator.iteration_task.done() and job.job in generator.jobs:
            await job.cancel()

    # Model card and unloading

    def card_parameters(self) -> dict[str, Any]:
        return {
            "max_seq_len": self.max_seq_len,
            "cache_size": self.cache_size,
            "cache_mode": self.cache_mode,
            "rope_scale": self.rope_scale,
            "rope_alpha": self.rope_alpha,
            "max_batch_size": self.max_batch_size,
            "chunk_size": self.chunk_size,
            "prompt_template": self.prompt_template,
            "use_vision": False,
        }

    def unload(self) -> None:
        """exllamav2's order: stop jobs, unload the model, close the generator, then free memory."""
        try:
            self._cancel_running_jobs()
        finally:
            try:
                self._unload_model()
            finally:
                try:
                    self._close_generator()
                finally:
                    self._free_memory()

    def _cancel_running_jobs(self) -> None:
        generator, loop, jobs = self._generator, self._generator_loop, list(self._jobs)
        if generator is None or loop is None or not jobs:
            return
        run_on_loop(loop, cancel_jobs(generator, jobs), lambda: halt_jobs(generator, jobs))

    def _unload_model(self) -> None:
        model, self._model = self._model, None
        try:
            if model is not None:
                model.unload()
        finally:
            self._config = self._cache = self._tokenizer = self._template = None

    def _close_generator(self) -> None:
        generator, loop = self._generator, self._generator_loop
        self._generator, self._generator_loop = None, None
        self._jobs.clear()
        if generator is not None and loop is not None:
            run_on_loop(loop, generator.close(), generator.iteration_task.cancel)

    def _free_memory(self) -> None:
        import torch

        collect_all()
        torch.cuda.empty_cache()
