"""Model and engine configuration shared by loaders, model, scheduler and CLI (torch-free, so the CLI starts fast)."""
from __future__ import annotations

from dataclasses import dataclass, field

# auto: weights from the model file; dummy: random weights for a config.json alone (vLLM's name), so a
# benchmark of any shape runs where no weight file can be copied.
LOAD_FORMATS = ("auto", "dummy")


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder, filled in by a loader (GGUF or HF)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class EngineConfig:
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct GGUF
    load_format: str = "auto"  # one of LOAD_FORMATS
    dtype: str = "auto"  # auto: bfloat16 where the device has fast bf16, else float32
    device: str = "auto"
    max_batch_size: int = 256
    max_num_batched_tokens: int = 4096
    # While requests decode, iterations hold at most this many tokens, decodes first (None: no cap)
    decode_token_budget: int | None = None
    max_model_len: int | None = None
    kv_cache_memory: str | float = "4GiB"  # bytes ("4GiB", 1000000) or a fraction of free memory (0.3)
    block_size: int = 16
    enable_prefix_caching: bool = True
    preemption: str = "reserve"
    # Every request's tokens independent of what shares its batch, how its prompt is chunked and what
    # the prefix cache holds; requests with a seed get this anyway. Costs prefill speed.
    batch_invariant: bool = False
    enforce_eager: bool = False  # on CUDA: no CUDA graphs for decode steps (vLLM's flag)
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # "uni": the model in this process; "mp": one worker process per rank, even for one rank (vLLM's name).
    # None: "uni" for one rank, else "mp".
    distributed_executor_backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size
