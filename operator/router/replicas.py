"""The replica set: what the endpoint source says exists, plus what the router's own probes say.

Kubernetes readiness lags (the kubelet probes every few seconds, then the Endpoints update has to
propagate), so the router probes each replica itself every `scrape_interval`: `/ready` tells it a
replica is draining as soon as SIGTERM arrives, and `/metrics` gives the queue lengths and KV usage
the policy scores. A replica that cannot be scraped gets no traffic: an unknown load is not a zero load.

Everything here runs on the event loop (the Endpoints thread hands its lists over with
`call_soon_threadsafe`), so the states need no locks.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from . import policy
from .endpoints import Endpoint, EndpointSource
from .policy import Choice, ReplicaState, ScoringWeights
from .prefix import PrefixIndex

SCRAPE_FAILURES_TOLERATED = 3  # misses in a row (timeouts) before a replica's load counts as unknown
log = logging.getLogger("orca.router")

RUNNING, WAITING, KV_USAGE = "orca:num_requests_running", "orca:num_requests_waiting", "orca:kv_cache_usage_perc"


def parse_load(text: str) -> tuple[float, float, float | None]:
    """Running, waiting and KV usage from an engine's /metrics, each summed over its label sets
    (one per model name); ValueError when the queue gauges are missing, since the load is then unknown."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in (RUNNING, WAITING, KV_USAGE):
            totals[family.name] = sum(sample.value for sample in family.samples if sample.name == family.name)
    if RUNNING not in totals or WAITING not in totals:
        raise ValueError(f"no {RUNNING} / {WAITING} gauges")
    return totals[RUNNING], totals[WAITING], totals.get(KV_USAGE)


class ReplicaSet:
    def __init__(self, source: EndpointSource, scrape_interval: float = 1.0, scrape_timeout: float = 1.0,
                 failure_cooldown: float = 5.0, weights: ScoringWeights = policy.DEFAULT_WEIGHTS,
                 prefix_index: PrefixIndex | None = None) -> None:
        self.source, self.scrape_interval, self.scrape_timeout = source, scrape_interval, scrape_timeout
        self.failure_cooldown, self.weights = failure_cooldown, weights
        self.prefix_index = prefix_index if prefix_index is not None else PrefixIndex()
        self.replicas: dict[str, ReplicaState] = {}
        self.synced = False  # the source has listed and the first probe round over that list finished
        self.round_robin_counter = 0
        self._listed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- membership (from the source) ---

    def update(self, endpoints: list[Endpoint]) -> None:
        current = {endpoint.address: endpoint for endpoint in endpoints}
        for address in list(self.replicas):
            if address not in current:
                log.info("replica %s removed", self.replicas.pop(address).label)
        for address, endpoint in current.items():
            replica = self.replicas.get(address)
            if replica is None:
                self.replicas[address] = ReplicaState(address, endpoint.pod_name, ready_in_endpoints=endpoint.ready)
                log.info("replica %s added (%s)", endpoint.pod_name or address, address)
            else:
                replica.pod_name, replica.ready_in_endpoints = endpoint.pod_name, endpoint.ready
        self._listed.set()

    # --- routing (from the proxy) ---

    def pick(self, exclude: set[str], count_load: bool = True, block_hashes: Sequence[int] = ()) -> Choice | None:
        """`count_load=False` for requests that cost the engine nothing (/v1/models). The chosen
        replica is recorded as the holder of `block_hashes` (the request's prompt prefix) at once,
        so the next request sharing it follows even before this one finishes."""
        affinity = self.weights.prefix_affinity and len(block_hashes) > 0
        choice = policy.choose(list(self.replicas.values()), exclude, self.round_robin_counter, time.monotonic(),
                               self.weights, block_hashes,
                               self.prefix_index.lookup(block_hashes) if affinity else None)
        self.round_robin_counter += 1
        if choice is not None:
            if count_load:
                choice.replica.routed_since_scrape += 1
                choice.counted_at_scrape = choice.replica.scrapes
            if affinity:
                self.prefix_index.record(block_hashes, choice.replica.address)
        return choice

    def release(self, choice: Choice) -> None:
        """The request sent by `choice` is over (answered, failed or abandoned). If no scrape has
        happened since it was sent, it is still in routed_since_scrape: take it out."""
        if choice.counted_at_scrape is not None and choice.counted_at_scrape == choice.replica.scrapes:
            choice.replica.routed_since_scrape = max(0, choice.replica.routed_since_scrape - 1)
        choice.counted_at_scrape = None

    def mark_failed(self, replica: ReplicaState) -> None:
        """Keep a replica that refused a connection out until the cooldown ends, even if a probe
        round in between happens to reach it."""
        replica.failed_until = time.monotonic() + self.failure_cooldown

    def num_available(self) -> int:
        now = time.monotonic()
        return sum(policy.is_eligible(replica, set(), now) for replica in self.replicas.values())

    # --- lifecycle ---

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self.source.run(self.update), name="router-endpoints"),
                       asyncio.create_task(self._scrape_forever(), name="router-scraper")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _scrape_forever(self) -> None:
        async with httpx.AsyncClient(timeout=self.scrape_timeout) as client:
            await self._listed.wait()
            while True:
                started = time.monotonic()
                await self.scrape_all(client)
                self.synced = True
                await asyncio.sleep(max(0.0, self.scrape_interval - (time.monotonic() - started)))

    async def scrape_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self.scrape(client, replica) for replica in list(self.replicas.values())))

    async def _get(self, client: httpx.AsyncClient, url: str) -> httpx.Response:
        """httpx's timeout bounds each phase; this bounds the whole exchange."""
        return await asyncio.wait_for(client.get(url), self.scrape_timeout)

    async def scrape(self, client: httpx.AsyncClient, replica: ReplicaState) -> None:
        routed_before = replica.routed_since_scrape
        base = f"http://{replica.address}"
        metrics, ready = await asyncio.gather(self._get(client, f"{base}/metrics"), self._get(client, f"{base}/ready"),
                                              return_exceptions=True)
        was_available = replica.metrics_ok and replica.ready_probe_ok and not replica.draining
        if isinstance(ready, httpx.Response):
            replica.ready_probe_ok, replica.draining = ready.status_code == 200, ready.status_code == 503
        elif isinstance(ready, httpx.ConnectError) or replica.scrape_failures + 1 >= SCRAPE_FAILURES_TOLERATED:
            replica.ready_probe_ok, replica.draining = False, False
        try:
            if not isinstance(metrics, httpx.Response):
                raise metrics
            metrics.raise_for_status()
            running, waiting, kv_usage = parse_load(metrics.text)
        except Exception as error:
            # A busy engine may miss one deadline: only a refused connection or several misses in a
            # row make it unavailable; until then its last load stands.
            replica.scrape_failures += 1
            refused = isinstance(error, (httpx.ConnectError, httpx.HTTPStatusError))
            if refused or replica.scrape_failures >= SCRAPE_FAILURES_TOLERATED or not replica.metrics_ok:
                replica.metrics_ok = False
            if was_available and not replica.metrics_ok:
                log.warning("replica %s: metrics scrape failed (%s: %s)", replica.label, type(error).__name__,
                            error)
        else:
            replica.metrics_ok, replica.scrape_failures = True, 0
            replica.num_requests_running, replica.num_requests_waiting, replica.kv_cache_usage = \
                running, waiting, kv_usage
            # Requests routed while the scrape was in flight may not be in these gauges yet: keep them.
            replica.routed_since_scrape = max(0, replica.routed_since_scrape - routed_before)
            replica.scrapes += 1
        available = replica.metrics_ok and replica.ready_probe_ok and not replica.draining
        if available != was_available:
            state = "available" if available else ("draining" if replica.draining else "unavailable")
            log.info("replica %s is %s", replica.label, state)
