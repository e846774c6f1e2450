"""Orca engine: iteration-level scheduling and selective batching over a paged KV cache."""
from .llm import LLM
from .async_engine import AsyncLLMEngine
from .llm_engine import EngineConfig, LLMEngine
from .output_processor import RequestOutput
from .sequence import SamplingParams

__all__ = ["LLM", "AsyncLLMEngine", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
