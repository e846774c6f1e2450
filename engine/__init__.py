"""Orca engine: iteration-level scheduling and selective batching over a paged KV cache.

The public names load on first use (PEP 562), so importing a torch-free submodule such as the CLI
does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .async_engine import AsyncLLMEngine
    from .config import EngineConfig
    from .llm import LLM
    from .llm_engine import LLMEngine
    from .output_processor import RequestOutput
    from .sequence import SamplingParams

_MODULE_OF = {"LLM": ".llm", "AsyncLLMEngine": ".async_engine", "LLMEngine": ".llm_engine", "EngineConfig": ".config",
              "RequestOutput": ".output_processor", "SamplingParams": ".sequence"}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
