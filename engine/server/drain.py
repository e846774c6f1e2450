"""uvicorn with a graceful drain: what `orca serve` does on SIGTERM, and its exit when the engine fails.

SIGTERM (what Kubernetes sends) does not stop the server at once: readiness turns false so
traffic moves elsewhere, new API requests get 503, and requests in flight run to completion for
up to the drain timeout; then the server exits 0. A second signal exits immediately.

When the engine fails (its model loop raised, or a distributed worker died) every request in flight
has already been answered 503; the server stays up `FAILURE_GRACE_SECONDS` more, with /ready and
/health answering 503, then exits non-zero so Kubernetes restarts the pod (and with it the replica).
"""
from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from .app import ServerState

log = logging.getLogger("orca.serve")
FAILURE_GRACE_SECONDS = 3.0


class DrainingServer(uvicorn.Server):
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
        watchers = [asyncio.create_task(self._drain_when_asked()), asyncio.create_task(self._exit_when_engine_fails())]
        try:
            await super().main_loop()
        finally:
            for watcher in watchers:
                watcher.cancel()

    async def _exit_when_engine_fails(self) -> None:
        while self.state.engine.error is None:
            await asyncio.sleep(0.1)
        log.error("engine failed (%s); exiting in %.0fs", self.state.engine.error, FAILURE_GRACE_SECONDS)
        await asyncio.sleep(FAILURE_GRACE_SECONDS)
        self.should_exit = True

    async def _drain_when_asked(self) -> None:
        while not self.state.draining:
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + self.drain_timeout
        while (self.state.inflight or self.state.engine.num_streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.inflight:
            log.warning("drain timeout: cutting %d request(s) still in flight", self.state.inflight)
        self.should_exit = True
