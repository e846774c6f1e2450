"""Orca engine: iteration-level scheduling and selective batching over a paged KV cache."""
from .llm import LLM
from .llm_engine import EngineConfig, LLMEngine, RequestOutput
from .sequence import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
