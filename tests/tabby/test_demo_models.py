"""The demo-model maker: real, loadable Hugging Face folders with random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tabby.demo import (
    BOS_TOKEN_ID,
    DEMO_MODELS,
    EOS_TOKEN_ID,
    IM_START_TOKEN_ID,
    DemoModel,
    make_demo_models,
    weight_bytes,
    weight_shapes,
)

TINY = "Tiny-Chat-5M"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Made once for the module: every test below only reads it.
    target = tmp_path_factory.mktemp("models")
    (folder,) = make_demo_models(target, [TINY], log=lambda line: None)
    return folder


def _spec(name: str) -> DemoModel:
    return next(spec for spec in DEMO_MODELS if spec.name == name)


def test_there_are_three_models_in_size_order_with_readable_names() -> None:
    assert [spec.name for spec in DEMO_MODELS] == ["Tiny-Chat-5M", "Small-Chat-200M", "Large-Chat-1G"]
    sizes = [weight_bytes(spec) for spec in DEMO_MODELS]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize(("name", "expected_bytes"), [("Tiny-Chat-5M", 5e6), ("Small-Chat-200M", 200e6), ("Large-Chat-1G", 1e9)])
def test_each_spec_has_the_size_its_name_promises(name: str, expected_bytes: float) -> None:
    assert 0.75 * expected_bytes <= weight_bytes(_spec(name)) <= 1.25 * expected_bytes


@pytest.mark.parametrize("spec", DEMO_MODELS, ids=lambda spec: spec.name)
def test_each_spec_has_sensible_shapes(spec: DemoModel) -> None:
    assert 32 <= spec.head_dim <= 128
    assert spec.head_dim * spec.num_attention_heads == spec.hidden_size
    assert spec.num_attention_heads % spec.num_key_value_heads == 0
    assert spec.config()["tie_word_embeddings"] is False


def test_two_architectures_are_exercised() -> None:
    assert {spec.architecture for spec in DEMO_MODELS} == {"LlamaForCausalLM", "Qwen2ForCausalLM"}


def test_qwen2_weights_have_qkv_biases_and_llama_weights_do_not() -> None:
    small = weight_shapes(_spec("Small-Chat-200M"))
    tiny = weight_shapes(_spec(TINY))
    assert "model.layers.0.self_attn.q_proj.bias" in small
    assert not any(name.endswith(".bias") for name in tiny)
    assert "lm_head.weight" in tiny and "model.embed_tokens.weight" in tiny


def test_it_makes_a_tiny_model_of_about_five_megabytes(tiny_folder: Path) -> None:
    size = (tiny_folder / "model.safetensors").stat().st_size
    assert 0.75 * 5e6 <= size <= 1.25 * 5e6
    assert not (tiny_folder / "model.safetensors.index.json").exists()


def test_it_writes_a_normal_model_folder(tiny_folder: Path) -> None:
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    assert config["max_position_embeddings"] == 2048
    assert json.loads((tiny_folder / "generation_config.json").read_text())["eos_token_id"] == EOS_TOKEN_ID
    tokenizer_config = json.loads((tiny_folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert isinstance(tokenizer_config["chat_template"], str)
    assert (tiny_folder / "special_tokens_map.json").is_file()


def test_it_makes_a_loadable_tiny_model(tiny_folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_folder)
    assert config.vocab_size == 2048 and config.num_hidden_layers >= 2
    # Typed as the model alone, though output_loading_info makes it a (model, info) pair.
    loaded: Any = AutoModelForCausalLM.from_pretrained(tiny_folder, output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    input_ids = torch.tensor([[BOS_TOKEN_ID, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, 5, 2048)
    assert torch.isfinite(logits).all()


def test_its_weights_are_deterministic_and_initialised_as_documented(tiny_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    (again,) = make_demo_models(tmp_path, [TINY], log=lambda line: None)
    first = load_file(tiny_folder / "model.safetensors")
    second = load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert torch.equal(first["model.norm.weight"], torch.ones(128))
    assert abs(first["model.embed_tokens.weight"].std().item() - 0.02) < 0.002


def test_its_tokenizer_round_trips_utf8_and_keeps_chat_tokens_whole(tiny_folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    assert len(tokenizer) == 2048
    text = "Grüße, 世界! 🎉 tabs\tand\nnewlines  \x00 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [IM_START_TOKEN_ID]
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [EOS_TOKEN_ID]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 0)


def test_its_chat_template_renders_chatml(tiny_folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "you?"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nAnd you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert isinstance(without_prompt, str)
    assert without_prompt.endswith("Hi<|im_end|>\n")


def test_it_skips_models_already_there(tiny_folder: Path) -> None:
    before = (tiny_folder / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert make_demo_models(tiny_folder.parent, [TINY], log=lines.append) == [tiny_folder]
    assert lines == [f"{TINY}: already there"]
    assert (tiny_folder / "model.safetensors").stat().st_mtime_ns == before


def test_it_logs_the_size_and_time_of_each_model_made(tmp_path: Path) -> None:
    lines: list[str] = []
    make_demo_models(tmp_path, [TINY], log=lines.append)
    assert len(lines) == 1
    assert lines[0].startswith(f"{TINY}: made 5.2 MB") and lines[0].endswith(" s")


def test_it_leaves_no_partial_folder_behind(tmp_path: Path) -> None:
    make_demo_models(tmp_path, [TINY], log=lambda line: None)
    assert [path.name for path in tmp_path.iterdir()] == [TINY]


def test_it_cleans_up_the_leftovers_of_an_interrupted_run(tmp_path: Path) -> None:
    # A partial folder named after a process that no longer exists.
    leftover = tmp_path / f".{TINY}.partial-999999999"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    make_demo_models(tmp_path, [TINY], log=lambda line: None)
    assert sorted(path.name for path in tmp_path.iterdir()) == [TINY]


def test_an_interrupted_run_never_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tabby.demo import writing

    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(writing, "_write_weights", fail)
    with pytest.raises(KeyboardInterrupt):
        make_demo_models(tmp_path, [TINY], log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_it_refuses_to_overwrite_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / TINY).mkdir()
    (tmp_path / TINY / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_demo_models(tmp_path, [TINY], log=lambda line: None)
    assert (tmp_path / TINY / "notes.txt").read_text() == "mine"


def test_it_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown demo model"):
        make_demo_models(tmp_path, ["Huge-Chat-1T"], log=lambda line: None)
