"""`orca` command line: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import sys

from .llm_engine import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by every subcommand that builds an engine (names follow vLLM's)."""
    d = EngineConfig()
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: bundled SmolLM2-135M)")
    p.add_argument("--dtype", default=d.dtype, help="auto | bfloat16 | float32 | float16")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=d.kv_cache_memory, help="bytes (4GiB) or fraction of free memory (0.3)")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--preemption", choices=["reserve", "recompute"], default=d.preemption)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                        kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
                        enable_prefix_caching=args.enable_prefix_caching, preemption=args.preemption)


def cmd_generate(args: argparse.Namespace) -> int:
    from .llm import LLM
    from .sequence import SamplingParams

    cfg = engine_config(args)
    llm = LLM(**vars(cfg))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    if args.raw:
        outs = llm.generate(args.prompt, params, use_tqdm=False)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    for prompt, out in zip(args.prompt, outs):
        print(f"### {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orca", description="Orca LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompt", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="plain completion instead of the chat template")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    from .bench import add_bench_args
    from .server.serve import add_serve_args

    add_serve_args(sub)
    add_bench_args(sub)
    from orca.operator.main import add_operator_args

    add_operator_args(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad user input: one clear line, no traceback
        print(f"orca: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
