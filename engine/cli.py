"""`orca` command line: one entry point, one subcommand per job.

Building the parser imports no torch, server or Kubernetes library: each subcommand imports what it
needs when it runs, so `orca bench throughput` works on a GPU box without the server's dependencies
and `orca --help` answers at once.
"""
from __future__ import annotations

import argparse
import sys

from .arg_utils import add_engine_args, engine_config


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
    from orca.operator.router.main import add_router_args

    add_router_args(sub)
    from orca.operator.dev.main import add_dev_args

    add_dev_args(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # bad user input: one clear line, no traceback
        print(f"orca: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
