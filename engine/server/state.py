"""What every part of the server shares: the engine, the served model's name, and the counters
that admission, the gate and the drain read and write (all on the one event loop, so no locks)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..async_engine import AsyncLLMEngine
from .metrics import Metrics


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_name: str
    metrics: Metrics
    api_key: str | None = None
    max_waiting: int = 512
    draining: bool = False
    queued: int = 0  # submitted, no token yet: the server's view of the waiting queue
    inflight: int = 0  # HTTP requests on /v1 being answered
    created: int = field(default_factory=lambda: int(time.time()))
