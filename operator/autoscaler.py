"""The autoscaler's decisions as pure functions, as dask-kubernetes shapes its own: the timer in
`handlers.py` scrapes the engines and patches `spec.replicas`, and reconciliation does the rest.

The rule is the HorizontalPodAutoscaler's: for a load metric, desired = ceil(sum over available
replicas / target); for the latency objective, desired = ceil(current * observed / target). The
result is clamped to [min, max] and to at most double per step. Stabilization is HPA's too: a
scale-up uses the lowest recommendation of the up window (a spike must last), a scale-down the
highest of the down window (a lull must last), so flapping load does not flap replicas.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Obj = dict

# spec.autoscaling.metric -> the engine gauge it sums (the latency objective reads a histogram)
LOAD_METRICS = {"requestsWaiting": "orca:num_requests_waiting", "requestsRunning": "orca:num_requests_running",
                "kvCacheUsage": "orca:kv_cache_usage_perc"}
LATENCY_METRIC = "timeToFirstTokenP90"
TTFT_HISTOGRAM = "orca:time_to_first_token_seconds"
DEFAULT_TARGETS = {"requestsWaiting": 2.0, "requestsRunning": 16.0, "kvCacheUsage": 0.8, LATENCY_METRIC: 1.0}


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    metric: str
    target: float
    scale_up_window_seconds: float
    scale_down_window_seconds: float
    latency_window_seconds: float
    drain_timeout_seconds: float

    @classmethod
    def from_spec(cls, spec: Obj) -> Policy:
        auto = spec.get("autoscaling") or {}
        metric = auto.get("metric", "requestsWaiting")
        return cls(int(auto.get("minReplicas", 1)), int(auto.get("maxReplicas", 1)), metric,
                   float(auto.get("target", DEFAULT_TARGETS[metric])),
                   float(auto.get("scaleUpStabilizationSeconds", 0)),
                   float(auto.get("scaleDownStabilizationSeconds", 300)),
                   float(auto.get("latencyWindowSeconds", 60)), float(auto.get("drainTimeoutSeconds", 120)))


@dataclass(frozen=True)
class Recommendation:
    replicas: int
    value: float | None  # the metric as the rule saw it (a sum, or the latency)
    reason: str


def recommend(current: int, values: Sequence[float | None], policy: Policy) -> Recommendation:
    """What the metric asks for now. `values` holds one entry per replica: None where its scrape
    failed, which makes it unavailable: it neither adds load nor counts as idle."""
    available = [v for v in values if v is not None]
    if not available:  # nothing to measure: hold, within the bounds
        held = min(max(current, policy.min_replicas), policy.max_replicas)
        return Recommendation(held, None, "no replica answered its metrics scrape; holding")
    if policy.metric == LATENCY_METRIC:
        observed = max(available)
        wanted = math.ceil(current * observed / policy.target) if policy.target > 0 else policy.max_replicas
        why = f"time to first token p90 {observed:.3f}s against a target of {policy.target:g}s"
    else:
        observed = sum(available)
        wanted = math.ceil(observed / policy.target) if policy.target > 0 else policy.max_replicas
        why = f"{policy.metric} {observed:g} over {len(available)} replicas against a target of {policy.target:g} each"
        missing = len(values) - len(available)
        if missing and wanted < current and policy.target > 0:
            # HPA's rule: a replica that did not answer (starting, or too busy to) may be as loaded as
            # the target; scale down only if that reading too asks for fewer
            wanted = max(wanted, math.ceil((observed + missing * policy.target) / policy.target))
            why += f"; {missing} unavailable counted at the target"
    clamped = min(max(wanted, policy.min_replicas), policy.max_replicas, max(2 * current, 1))
    if clamped != wanted:
        why += f" (asks {wanted}; clamped to {clamped}: min {policy.min_replicas}, max {policy.max_replicas}, " \
               f"at most doubling)"
    return Recommendation(clamped, observed, why)


def stabilize(current: int, history: Iterable[tuple[float, int]], now: float, policy: Policy) -> int:
    """The replica count to act on, from the recommendations (time, replicas) seen so far."""
    history = list(history)
    latest = history[-1][1] if history else current
    if latest > current:
        window = [r for t, r in history if now - t <= policy.scale_up_window_seconds] or [latest]
        return max(current, min(window))
    if latest < current:
        window = [r for t, r in history if now - t <= policy.scale_down_window_seconds] or [latest]
        return min(current, max(window))
    return current


def histogram_quantile(quantile: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets; None without samples."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = quantile * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # the quantile is in the open-ended bucket: its lower edge, as Prometheus does
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return ordered[-1][0]


def bucket_increase(now: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]] | None
                    ) -> list[tuple[float, float]]:
    """Per-bucket increase since an earlier scrape; a counter that went down means the engine restarted."""
    earlier = dict(before or [])
    if any(count < earlier.get(bound, 0.0) for bound, count in now):
        return list(now)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in now]


def scale_down_victim(replicas: int) -> int:
    """The replica group a scale-down removes: the highest ordinal, as a StatefulSet would."""
    return replicas - 1
