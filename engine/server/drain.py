"""uvicorn with a graceful drain: what `orca serve` does on SIGTERM.

SIGTERM (what Kubernetes sends) does not stop the server at once: readiness turns false so
traffic moves elsewhere, new API requests get 503, and requests in flight run to completion for
up to the drain timeout; then the server exits 0. A second signal exits immediately.
"""
from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from .app import ServerState

log = logging.getLogger("orca.serve")


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
