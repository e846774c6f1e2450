"""Model loading: a GGUF file, a Hugging Face directory or (dummy) a config.json becomes config + HF-named weights + tokenizer."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from ..bundled_model import bundled_model_path
from ..config import LOAD_FORMATS, ModelConfig
from ..tokenizer import Tokenizer

if TYPE_CHECKING:  # torch stays out of the import, so the torch-free `gguf_tokenizer` can live here
    import torch

WeightIterator: TypeAlias = Iterator[tuple[str, "torch.Tensor"]]
WeightFilter = Callable[[str], bool]  # which checkpoint names to read: a pipeline stage skips the others'


@dataclass
class LoadedModel:
    """What the engine needs to build a model.

    `weights(wanted=None)` yields `(hf_name, float32 tensor)` one at a time (HF Llama names and
    `[out_features, in_features]` layout), so peak memory stays near one tensor; it may be called again.
    """

    config: ModelConfig
    weights: Callable[..., WeightIterator]
    num_weights: int
    tokenizer: Tokenizer


def load_model(path: str | None = None, load_format: str = "auto") -> LoadedModel:
    """Load a `.gguf` file or a Hugging Face model directory; `None` means the bundled default.

    `load_format="dummy"` reads only a config.json (or a bundled shape's name) and makes random weights.
    """
    # The loader modules are imported here because they import LoadedModel from this package.
    if load_format == "dummy":
        from .dummy import load_dummy

        return load_dummy(path)
    if load_format != "auto":
        raise ValueError(f"load_format={load_format!r} must be one of {', '.join(LOAD_FORMATS)}")
    path = path or bundled_model_path()
    if os.path.isdir(path):
        from .hf import load_hf

        return load_hf(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Model path {path!r} does not exist.")
    if path.endswith(".gguf"):
        from .gguf import load_gguf

        return load_gguf(path)
    raise ValueError(f"Cannot load {path!r}: expected a .gguf file or a Hugging Face model directory.")
