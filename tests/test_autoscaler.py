"""Unit tests of the autoscaler's pure decisions (operator/autoscaler.py) and of reading engine metrics."""
from __future__ import annotations

import math

import pytest

from orca.operator import autoscaler
from orca.operator.autoscaler import Policy, histogram_quantile, recommend, stabilize
from orca.operator.engine_metrics import parse
from orca.operator.scaling import ScalingMemory, metric_values


def policy(**overrides) -> Policy:
    spec = {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "metric": "requestsWaiting",
                            "target": 2, "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 60,
                            **overrides}}
    return Policy.from_spec(spec)


def test_desired_is_the_ceiling_of_the_sum_over_the_target_clamped_to_min_and_max() -> None:
    assert recommend(1, [5.0], policy()).replicas == 2  # ceil(5 / 2) = 3, but at most doubling
    assert recommend(2, [5.0, 0.0], policy()).replicas == 3
    assert recommend(3, [40.0, 40.0, 40.0], policy()).replicas == 3  # max
    assert recommend(3, [0.0, 0.0, 0.0], policy()).replicas == 1  # min
    assert recommend(2, [1.0, 1.0], policy(minReplicas=2)).replicas == 2
    assert "at most doubling" in recommend(1, [5.0], policy()).reason


def test_doubling_limit_from_one_and_from_zero() -> None:
    assert recommend(1, [100.0], policy(maxReplicas=10)).replicas == 2
    assert recommend(4, [100.0] * 4, policy(maxReplicas=10)).replicas == 8
    assert recommend(0, [], policy(minReplicas=0)).replicas == 0  # nothing to measure: hold
    assert recommend(0, [], policy(minReplicas=1)).replicas == 1  # but never below the minimum
    assert recommend(5, [None] * 5, policy()).replicas == 3  # nor above the maximum


def test_a_failed_scrape_is_unavailable_not_zero_load() -> None:
    # two replicas, one unreachable: the other's load alone decides; it does not look half as busy
    assert recommend(2, [4.0, None], policy()).replicas == 2
    assert recommend(2, [None, None], policy()).replicas == 2  # nothing answered: hold
    assert "holding" in recommend(2, [None, None], policy()).reason
    # HPA's rule: on the way down, an unanswered replica counts as loaded at the target
    down = recommend(3, [0.0, None, None], policy())
    assert down.replicas == 2 and "2 unavailable counted at the target" in down.reason
    assert recommend(4, [3.0, 3.0, None, None], policy(maxReplicas=4)).replicas == 4  # not 3: they may be busy
    assert recommend(1, [9.0, None], policy()).replicas == 2  # on the way up, the answers decide


def test_kv_cache_and_latency_objectives() -> None:
    kv = policy(metric="kvCacheUsage", target=0.5)
    assert recommend(1, [0.9], kv).replicas == 2 and recommend(2, [0.1, 0.2], kv).replicas == 1
    latency = policy(metric="timeToFirstTokenP90", target=1.0)
    assert recommend(2, [1.4], latency).replicas == 3  # ceil(2 * 1.4 / 1.0)
    assert recommend(2, [0.2], latency).replicas == 1
    assert Policy.from_spec({"autoscaling": {"metric": "timeToFirstTokenP90"}}).target == 1.0


def test_scale_up_window_takes_the_lowest_and_scale_down_window_the_highest() -> None:
    p = policy(scaleUpStabilizationSeconds=10, scaleDownStabilizationSeconds=60)
    assert stabilize(1, [(0.0, 1), (5.0, 3)], now=5.0, policy=p) == 1  # the spike has not lasted 10 s
    assert stabilize(1, [(0.0, 1), (5.0, 3), (12.0, 3), (16.0, 2)], now=16.0, policy=p) == 2
    assert stabilize(1, [(0.0, 3), (20.0, 3)], now=20.0, policy=p) == 3  # lasted the whole window
    assert stabilize(3, [(0.0, 3), (30.0, 1)], now=30.0, policy=p) == 3  # down: a recommendation of 3 is in the window
    assert stabilize(3, [(0.0, 3), (30.0, 1), (70.0, 1)], now=70.0, policy=p) == 1
    assert stabilize(2, [(0.0, 2)], now=0.0, policy=p) == 2
    instant = policy(scaleUpStabilizationSeconds=0)
    assert stabilize(1, [(0.0, 1), (1.0, 3)], now=1.0, policy=instant) == 3


def test_histogram_quantile_follows_prometheus() -> None:
    buckets = [(0.1, 10.0), (0.5, 50.0), (1.0, 90.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.9, buckets) == pytest.approx(1.0)
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.99, buckets) == 1.0  # in the +Inf bucket: its lower edge
    assert histogram_quantile(0.9, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert autoscaler.bucket_increase([(1.0, 5.0)], [(1.0, 2.0)]) == [(1.0, 3.0)]
    assert autoscaler.bucket_increase([(1.0, 1.0)], [(1.0, 2.0)]) == [(1.0, 1.0)]  # the engine restarted


METRICS = """# TYPE orca:num_requests_waiting gauge
orca:num_requests_waiting{model_name="m"} 3.0
# TYPE orca:num_requests_running gauge
orca:num_requests_running{model_name="m"} 4.0
# TYPE orca:kv_cache_usage_perc gauge
orca:kv_cache_usage_perc{model_name="m"} 0.25
# TYPE orca:time_to_first_token_seconds histogram
orca:time_to_first_token_seconds_bucket{le="0.5",model_name="m"} 8.0
orca:time_to_first_token_seconds_bucket{le="2.0",model_name="m"} 10.0
orca:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 10.0
orca:time_to_first_token_seconds_count{model_name="m"} 10.0
orca:time_to_first_token_seconds_sum{model_name="m"} 4.0
"""


def test_engine_metrics_are_parsed_and_the_latency_comes_from_the_window() -> None:
    sample = parse(METRICS)
    assert sample.gauges == {"orca:num_requests_waiting": 3.0, "orca:num_requests_running": 4.0,
                             "orca:kv_cache_usage_perc": 0.25} and sample.in_flight == 7.0
    assert sample.ttft_buckets == [(0.5, 8.0), (2.0, 10.0), (math.inf, 10.0)]
    assert metric_values(policy(), [0, 1], {0: sample, 1: None}, ScalingMemory(), 0.0) == [3.0, None]
    latency, memory = policy(metric="timeToFirstTokenP90", latencyWindowSeconds=30), ScalingMemory()
    first = metric_values(latency, [0], {0: sample}, memory, 0.0)
    assert first == [None]  # one snapshot holds no window yet: hold
    later = parse(METRICS.replace('le="0.5",model_name="m"} 8.0', 'le="0.5",model_name="m"} 8.0')
                  .replace('le="2.0",model_name="m"} 10.0', 'le="2.0",model_name="m"} 20.0')
                  .replace('le="+Inf",model_name="m"} 10.0', 'le="+Inf",model_name="m"} 20.0'))
    (p90,) = metric_values(latency, [0], {0: later}, memory, 10.0)
    assert 0.5 < p90 <= 2.0  # all ten new first tokens took between 0.5 and 2 s
