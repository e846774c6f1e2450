"""The same model file loaded by transformers: the reference for parity tests and the static-batching baseline.

transformers is a test and benchmark dependency only, so it is imported when a reference is built.
"""
from __future__ import annotations

import os
from typing import Any

from .bundled_model import bundled_model_path


def load_hf_model(model: str | None, dtype: str) -> Any:
    """A GGUF file (default: the bundled one, dequantized by transformers) or an HF directory, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = model or bundled_model_path()
    torch_dtype = getattr(torch, dtype)
    if path.endswith(".gguf"):
        directory, name = os.path.split(os.path.abspath(path))
        hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch_dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return hf.eval()
