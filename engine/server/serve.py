"""`orca serve`: build the engine, then run the app under uvicorn with a graceful drain.

SIGTERM (what Kubernetes sends) does not stop the server at once: readiness turns false so
traffic moves elsewhere, new API requests get 503, and requests in flight run to completion for
up to --drain-timeout seconds; then the server exits 0. A second signal exits immediately.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

import uvicorn

from ..cli import add_engine_args, engine_config
from ..async_engine import AsyncLLMEngine
from ..llm_engine import LLMEngine
from .app import ServerState, build_app
from .metrics import Metrics

log = logging.getLogger("orca.serve")


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
    p.set_defaults(func=cmd_serve)


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.state.draining:  # second signal: stop now
            super().handle_exit(sig, frame)
            return
        log.info("signal %s: draining (up to %.0fs)", sig, self.drain_timeout)
        self.state.draining = True

    async def main_loop(self) -> None:
        # uvicorn's loop ticks until should_exit; run the drain watcher beside it.
        watcher = asyncio.create_task(self._drain_when_asked())
        try:
            await super().main_loop()
        finally:
            watcher.cancel()

    async def _drain_when_asked(self) -> None:
        while not self.state.draining:
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + self.drain_timeout
        while (self.state.inflight or self.state.engine.num_streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.inflight:
            log.warning("drain timeout: cutting %d request(s) still in flight", self.state.inflight)
        self.should_exit = True


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = LLMEngine(engine_config(args))
    name = args.served_model_name or engine.model_name
    metrics = Metrics(name)
    state = ServerState(AsyncLLMEngine(engine, on_step=metrics.on_step), name, metrics,
                        api_key=args.api_key or None, max_waiting=args.max_waiting)
    # The drain already gave requests their time; uvicorn's own grace period only lets the last
    # bytes of finished responses out, so the exit comes soon after --drain-timeout.
    config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=1)
    server = _DrainingServer(config, state, args.drain_timeout)
    log.info("serving %s on http://%s:%d", name, args.host, args.port)
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m orca.engine.server.serve [flags]`: the same server without the `orca` CLI around it."""
    parser = argparse.ArgumentParser(prog="orca")
    add_serve_args(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
