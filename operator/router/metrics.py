"""The router's own Prometheus metrics, `orca:router_` names beside the engines' `orca:` ones.

A registry of its own, so the router's /metrics shows only what the router measured (not the
process collectors of whatever else runs in the interpreter, such as the tests' upstreams).
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from .policy import AFFINITY_OUTCOMES

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
NO_REPLICA = "none"  # the `replica` label of requests answered by the router itself (503: none available)


class RouterMetrics:
    def __init__(self, replicas_ready: Callable[[], float]) -> None:
        disable_created_metrics()  # no `*_created` series, as in the engine's metrics
        self.registry = r = CollectorRegistry()
        self.requests = Counter("orca:router_requests", "Requests answered, by the replica that answered and status",
                                ["replica", "code"], registry=r)
        self.upstream_errors = Counter("orca:router_upstream_errors",
                                       "Tries that failed on a replica (connection failed or 503 before any byte)",
                                       ["replica"], registry=r)
        self.retries = Counter("orca:router_retries", "Requests tried again on another replica", registry=r)
        self.upstream_latency = Histogram("orca:router_upstream_latency_seconds",
                                          "Time from sending to a replica to its response headers", ["replica"],
                                          buckets=_LATENCY, registry=r)
        self.prefix_affinity = Counter(
            "orca:router_prefix_affinity",
            "Requests with a prompt prefix to route by: hit (sent to the replica holding the prefix), overridden "
            "(held by a replica that was busier than the bound allows or unavailable), miss (no prefix known)",
            ["outcome"], registry=r)
        for outcome in AFFINITY_OUTCOMES:  # each series exists from the start, at 0
            self.prefix_affinity.labels(outcome)
        self.replicas_ready = Gauge("orca:router_replicas_ready", "Replicas that would be picked now", registry=r)
        self.replicas_ready.set_function(replicas_ready)
