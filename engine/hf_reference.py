"""The same model loaded by transformers: the reference for parity tests and the static-batching baseline.

transformers is a test and benchmark dependency only, so it is imported when a reference is built.
"""
from __future__ import annotations

import os
from typing import Any

from .bundled_model import bundled_model_path


def load_hf_model(model: str | None, dtype: str, load_format: str = "auto", device: str = "cpu") -> Any:
    """A GGUF file (default: the bundled one, dequantized by transformers), an HF directory, or with
    `load_format="dummy"` a config.json carrying the engine's own random weights; in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if load_format == "dummy":
        return _load_dummy_hf_model(model, torch_dtype, device).eval()
    path = model or bundled_model_path()
    if path.endswith(".gguf"):
        directory, name = os.path.split(os.path.abspath(path))
        hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch_dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return hf.to(device).eval()


def _load_dummy_hf_model(model: str | None, torch_dtype: Any, device: str) -> Any:
    """transformers' model of the config, its weights replaced by the dummy loader's tensor by tensor.

    A baseline or parity check is only meaningful on the very network the engine runs, so the weights come
    from the engine's loader (same seed, same HF names) rather than transformers' own initialisation.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loaders.dummy import config_file, dummy_config, dummy_weights

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_file(model)), dtype=torch_dtype)
    # Tied embeddings appear once here (as model.embed_tokens.weight), as in the dummy loader's names.
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, tensor in dummy_weights(dummy_config(model)):
            params.pop(name).copy_(tensor)
    if params:
        raise KeyError(f"the dummy loader made no tensor for: {sorted(params)[:5]}")
    return hf
