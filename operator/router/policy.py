"""Which replica takes the next request: a pure function of what the router last learned about each.

Kept free of I/O and clocks (the caller passes `now`) so every rule is a unit test. The score is
`load` alone for now; a later policy can weigh `kv_cache_usage` and prefix affinity by replacing
`load` with a score and keeping `pick`'s eligibility and tie-breaking as they are.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class ReplicaState:
    """One engine replica as the router sees it; the endpoint source and the scraper keep it current."""

    address: str  # "ip:port", the key everywhere
    pod_name: str | None = None  # from the Endpoints targetRef; None for a static --upstream
    ready_in_endpoints: bool = True  # Kubernetes' view: in `addresses`, not `notReadyAddresses`
    ready_probe_ok: bool = False  # the router's own view: the last /ready answered 200
    draining: bool = False  # the last /ready answered 503: the engine refuses new requests
    metrics_ok: bool = False  # the last /metrics scrape succeeded; without it the load is unknown
    num_requests_running: float = 0.0
    num_requests_waiting: float = 0.0
    kv_cache_usage: float | None = None
    routed_since_scrape: int = 0  # requests sent since the scrape: the gauges do not count them yet
    failed_until: float = 0.0  # monotonic time; a connection failure keeps the replica out until then

    @property
    def label(self) -> str:
        """The name in the router's metrics and logs: the pod where known, else the address."""
        return self.pod_name or self.address


def is_eligible(replica: ReplicaState, exclude: set[str], now: float) -> bool:
    """Every source of doubt excludes: a replica whose scrape failed is unavailable, not idle."""
    return (replica.ready_in_endpoints and replica.ready_probe_ok and not replica.draining and replica.metrics_ok
            and replica.address not in exclude and replica.failed_until <= now)


def load(replica: ReplicaState) -> float:
    """Requests the replica has or is about to have, including those routed since its gauges were read."""
    return replica.num_requests_running + replica.num_requests_waiting + replica.routed_since_scrape


def pick(replicas: Iterable[ReplicaState], exclude: set[str], round_robin_counter: int,
         now: float) -> ReplicaState | None:
    """The least-loaded eligible replica; among equals the counter rotates, so equal replicas share
    traffic evenly instead of the first one in some order taking it all."""
    eligible = [replica for replica in replicas if is_eligible(replica, exclude, now)]
    if not eligible:
        return None
    least = min(load(replica) for replica in eligible)
    tied = sorted((replica for replica in eligible if load(replica) == least), key=lambda replica: replica.address)
    return tied[round_robin_counter % len(tied)]
