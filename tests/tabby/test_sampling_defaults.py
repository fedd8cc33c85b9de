"""A model's generation_config.json gives the sampling a request leaves unset (as vLLM does); the request wins."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tabby.engines.base import read_sampling_defaults
from tabby.responses import sampling_params
from tabby.schemas import ChatCompletionRequest


@dataclass
class Folder:
    """What `sampling_params` reads of an engine: where its model is and its context length."""

    model_dir: Path
    max_seq_len: int = 2048


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **fields})


def folder_with(tmp_path: Path, generation_config: object) -> Folder:
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return Folder(tmp_path)


def test_the_models_sampling_fills_what_the_request_leaves_unset(tmp_path: Path) -> None:
    engine = folder_with(
        tmp_path, {"eos_token_id": 2, "do_sample": True, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}
    )
    params = sampling_params(request(), engine, prompt_tokens=10)  # type: ignore[arg-type]
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (0.2, 0.9, 40, 0.0, 1.1)


def test_the_requests_own_sampling_wins_even_when_it_is_zero(tmp_path: Path) -> None:
    engine = folder_with(tmp_path, {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05})
    params = sampling_params(request(temperature=0, top_p=1.0, top_k=0, min_p=0), engine, prompt_tokens=10)  # type: ignore[arg-type]
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.0, 1.0, 0, 0.0)


@pytest.mark.parametrize(
    "generation_config",
    [
        {"do_sample": False, "temperature": 0.2},
        {"bos_token_id": 0, "eos_token_id": 2},
        ["not", "an", "object"],
        {"temperature": True},
    ],
)
def test_without_usable_sampling_in_the_model_the_neutral_defaults_apply(tmp_path: Path, generation_config: object) -> None:
    params = sampling_params(request(), folder_with(tmp_path, generation_config), prompt_tokens=10)  # type: ignore[arg-type]
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)


def test_a_missing_or_broken_generation_config_means_no_defaults(tmp_path: Path) -> None:
    assert read_sampling_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("{ not json")
    assert read_sampling_defaults(tmp_path) == {}
