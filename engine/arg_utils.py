"""Engine flags shared by every subcommand that builds an engine, named after vLLM's.

Torch-free: the CLI builds its whole parser from this, so `orca --help` starts at once.
"""
from __future__ import annotations

import argparse

from .config import LOAD_FORMATS, EngineConfig
from .distributed.contract import WorkerEnvironment

MODEL_HELP = ("GGUF file or Hugging Face directory (default: bundled SmolLM2-135M); with --load-format dummy, "
              "a config.json, its directory, or a bundled shape: smollm2-135m, llama-1b")
LOAD_FORMAT_HELP = "auto: weights from the model file; dummy: seeded random weights, only config.json needed"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--load-format", choices=LOAD_FORMATS, default=d.load_format, help=LOAD_FORMAT_HELP)
    p.add_argument("--dtype", default=d.dtype, help="auto | bfloat16 | float32 | float16")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--decode-token-budget", type=int, default=d.decode_token_budget,
                   help="while requests decode, an iteration holds at most this many tokens: decodes first, "
                        "prompt chunks in the rest (Sarathi-Serve), so prompts cannot stall the next tokens "
                        "(default: %(default)s; 0: no cap but --max-num-batched-tokens)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=d.kv_cache_memory, help="bytes (4GiB) or fraction of free memory (0.3)")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--preemption", choices=["reserve", "recompute"], default=d.preemption)
    p.add_argument("--batch-invariant", action="store_true",
                   help="every request's output independent of what shares its batch (requests with a seed "
                        "always are); prompts attend row by row, which costs prefill speed")
    p.add_argument("--enforce-eager", action="store_true", help="on CUDA, run decode steps without CUDA graphs")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="ranks per pipeline stage, each with a shard of every layer (default: $ORCA_TP, else 1)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None,
                   help="pipeline stages, each with a contiguous slice of the layers (default: $ORCA_PP, else 1)")
    p.add_argument("--distributed-executor-backend", choices=["uni", "mp"], default=None,
                   help="uni: the model in this process; mp: one worker process per rank (default: uni for one rank)")


def engine_config(args: argparse.Namespace, environment: WorkerEnvironment | None = None) -> EngineConfig:
    """The flags as a config; parallel sizes not given as flags come from the pod's contract environment."""
    environment = environment or WorkerEnvironment()
    return EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
                        max_batch_size=args.max_batch_size, max_num_batched_tokens=args.max_num_batched_tokens,
                        decode_token_budget=args.decode_token_budget or None, max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
                        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
                        preemption=args.preemption, batch_invariant=args.batch_invariant, enforce_eager=args.enforce_eager,
                        tensor_parallel_size=args.tensor_parallel_size or environment.tensor_parallel_size,
                        pipeline_parallel_size=args.pipeline_parallel_size or environment.pipeline_parallel_size,
                        distributed_executor_backend=args.distributed_executor_backend)
