"""Which replica takes the next request: a pure function of what the router last learned about each.

Kept free of I/O and clocks (the caller passes `now`) so every rule is a unit test. Each eligible
replica gets a score (lower is better) from its queue, its running batch and its KV cache use; a
request whose prompt prefix a replica likely still has cached goes there unless that replica is
clearly busier than the best one (the idea of llm-d's endpoint picker: prefix, queue and KV scorers).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

AffinityOutcome = Literal["hit", "overridden", "miss"]
AFFINITY_OUTCOMES: tuple[AffinityOutcome, ...] = ("hit", "overridden", "miss")


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
    routed_since_scrape: int = 0  # requests sent since the scrape and still open: the gauges miss them
    scrapes: int = 0  # successful scrapes so far: tells a request whether the gauges have seen it
    scrape_failures: int = 0  # scrapes missed in a row
    failed_until: float = 0.0  # monotonic time; a connection failure keeps the replica out until then

    @property
    def label(self) -> str:
        """The name in the router's metrics and logs: the pod where known, else the address."""
        return self.pod_name or self.address


def is_eligible(replica: ReplicaState, exclude: set[str], now: float) -> bool:
    """Every source of doubt excludes: a replica whose scrape failed is unavailable, not idle."""
    return (replica.ready_in_endpoints and replica.ready_probe_ok and not replica.draining and replica.metrics_ok
            and replica.address not in exclude and replica.failed_until <= now)


@dataclass(frozen=True)
class ScoringWeights:
    """How much each signal adds to a replica's score, and how prefix affinity weighs against it.

    A waiting request and a running one each count 1: both are work the replica must get through
    before (or while) it serves the new one, and the engine's scheduler admits waiting requests as
    running ones finish. KV usage (0..1) weighs 4: a nearly full cache means the engine must soon
    queue or preempt requests (and recompute their KV), which costs more than one more request in
    the batch, so a full cache counts like four queued requests. With the bound also 4, the holder
    of a prefix keeps it even with a full cache against empty ones when the queues are equal: a
    cached prefix shares its blocks rather than taking new ones.

    `affinity_bound`: how much worse than the best score the replica holding a request's prefix
    may be and still get it. Skipping a cached prefill saves about as much as a few requests'
    queueing, so 4; beyond that, load wins and a hot prefix cannot pile onto one replica.
    """

    waiting_weight: float = 1.0
    running_weight: float = 1.0
    kv_cache_weight: float = 4.0
    prefix_affinity: bool = True
    affinity_bound: float = 4.0

    def __post_init__(self) -> None:
        for name in ("waiting_weight", "running_weight", "kv_cache_weight", "affinity_bound"):
            value = getattr(self, name)
            if not value >= 0:  # NaN fails too
                raise ValueError(f"{name} must be >= 0, got {value}")


DEFAULT_WEIGHTS = ScoringWeights()


@dataclass(frozen=True)
class PrefixMatch:
    """The prefix index's answer for a request: the replica that last served its longest known prefix."""

    address: str
    num_blocks: int  # leading blocks of the request's prompt that replica served


@dataclass
class Choice:
    replica: ReplicaState
    affinity: AffinityOutcome | None  # None: affinity was not consulted (off, or no prompt to hash)
    counted_at_scrape: int | None = None  # set by the replica set when the request adds to the load


def score(replica: ReplicaState, weights: ScoringWeights = DEFAULT_WEIGHTS) -> float:
    """Lower is better. Requests routed since the last scrape and still open count as running: the
    gauges do not show them yet, and without them every request between two scrapes would go to one
    replica; one that has finished counts no more, or a replica serving short requests one after
    another would look busy and lose its prefix affinity."""
    return (weights.waiting_weight * replica.num_requests_waiting
            + weights.running_weight * (replica.num_requests_running + replica.routed_since_scrape)
            + weights.kv_cache_weight * (replica.kv_cache_usage or 0.0))


def choose(replicas: Iterable[ReplicaState], exclude: set[str], round_robin_counter: int, now: float,
           weights: ScoringWeights = DEFAULT_WEIGHTS, block_hashes: Sequence[int] = (),
           prefix_match: PrefixMatch | None = None) -> Choice | None:
    """The replica for a request whose prompt has `block_hashes`, `prefix_match` being the prefix
    index's answer for them.

    The holder of the matched prefix wins when it is eligible and its score is within
    `affinity_bound` of the best eligible score; otherwise the best score wins, the round-robin
    counter rotating among equals, so equal replicas share traffic instead of one taking it all.
    """
    eligible = [replica for replica in replicas if is_eligible(replica, exclude, now)]
    if not eligible:
        return None
    scores = {replica.address: score(replica, weights) for replica in eligible}
    best = min(scores.values())
    consulted = weights.prefix_affinity and len(block_hashes) > 0
    if consulted and prefix_match is not None:
        holder = next((replica for replica in eligible if replica.address == prefix_match.address), None)
        if holder is not None and scores[holder.address] <= best + weights.affinity_bound:
            return Choice(holder, "hit")
    tied = sorted((replica for replica in eligible if scores[replica.address] == best),
                  key=lambda replica: replica.address)
    outcome: AffinityOutcome | None = None
    if consulted:
        outcome = "miss" if prefix_match is None else "overridden"
    return Choice(tied[round_robin_counter % len(tied)], outcome)


def pick(replicas: Iterable[ReplicaState], exclude: set[str], round_robin_counter: int, now: float,
         weights: ScoringWeights = DEFAULT_WEIGHTS) -> ReplicaState | None:
    """The best-scored eligible replica, for a request without a prompt prefix."""
    choice = choose(replicas, exclude, round_robin_counter, now, weights)
    return choice.replica if choice is not None else None
