"""`orca serve`: build the engine, then run the app under uvicorn with a graceful drain (see `drain`).

The flags are defined here without importing the server's dependencies; `cmd_serve` imports them
when the server actually starts.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from typing import TYPE_CHECKING

from ..arg_utils import add_engine_args, engine_config

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..distributed.contract import WorkerEnvironment

log = logging.getLogger("orca.serve")


SERVE_DECODE_TOKEN_BUDGET = 512


def add_serve_args(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's name)")
    p.add_argument("--api-key", default=os.environ.get("ORCA_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: env ORCA_API_KEY)")
    p.add_argument("--max-waiting", type=int, default=512,
                   help="answer 429 when more requests than this wait for their first token")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--log-level", default="info")
    # Online, a running request's next token matters more than throughput (as vLLM's server
    # defaults differ from its offline ones): 512 tokens kept TPOT p99 at 48 ms at 2 req/s on two
    # cores where 4096 gave 63 ms, with better TTFT too.
    p.set_defaults(func=cmd_serve, decode_token_budget=SERVE_DECODE_TOKEN_BUDGET)


def cmd_serve(args: argparse.Namespace) -> int:
    """The master of a replica (and its first stage); in a pod of a later stage, that stage's workers alone."""
    import dataclasses

    from ..distributed.contract import POD_NAME, WorkerEnvironment

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    environment = WorkerEnvironment.from_environ()
    config = engine_config(args, environment)
    environment = dataclasses.replace(environment, tensor_parallel_size=config.tensor_parallel_size,
                                      pipeline_parallel_size=config.pipeline_parallel_size)
    in_pod = bool(os.environ.get(POD_NAME))  # the operator's pods: each stage in a pod of its own
    if in_pod and not environment.is_master:
        from ..distributed.stage_host import serve_stage

        return serve_stage(config, environment, args.host, args.port)
    return serve_master(args, config, environment if in_pod else None)


def serve_master(args: argparse.Namespace, config: EngineConfig, environment: WorkerEnvironment | None) -> int:
    import uvicorn

    from ..async_engine import AsyncLLMEngine
    from ..llm_engine import LLMEngine
    from .app import ServerState, build_app
    from .drain import DrainingServer
    from .metrics import Metrics

    engine = AsyncLLMEngine.build(lambda: LLMEngine(config, environment))
    name = args.served_model_name or engine.engine.model_name
    metrics = Metrics(name)
    engine.on_step = metrics.on_step
    state = ServerState(engine, name, metrics, api_key=args.api_key or None, max_waiting=args.max_waiting)
    # The drain already gave requests their time; uvicorn's own grace period only lets the last
    # bytes of finished responses out, so the exit comes soon after --drain-timeout.
    config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=1)
    server = DrainingServer(config, state, args.drain_timeout)
    logging.getLogger("uvicorn.access").addFilter(_not_a_routine_poll)
    log.info("serving %s on http://%s:%d", name, args.host, args.port)
    server.run()
    return 1 if state.engine.error is not None else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m orca.engine.server.serve [flags]`: the same server without the `orca` CLI around it."""
    parser = argparse.ArgumentParser(prog="orca")
    add_serve_args(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())


_ROUTINE_POLLS = ("/health", "/ready", "/metrics")


def _not_a_routine_poll(record: logging.LogRecord) -> bool:
    """Probes and the router's scrapes hit these every second or two; an access line each would
    bury the requests. Their failures still show (a non-200 is logged)."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (len(args) >= 5 and args[1] == "GET" and args[2] in _ROUTINE_POLLS and args[4] == 200)

