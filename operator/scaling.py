"""One autoscaler tick of one OrcaDeployment: scrape its engines, decide (`autoscaler.py`), act.

Scaling up patches `spec.replicas`; reconciliation creates the groups. Scaling down never removes a
replica with requests on it: the victim (the highest ordinal) is first taken out of the engine
Service (its pods labelled not serving, so the router sends it nothing new), then removed once its
running and waiting requests reach zero, or after `drainTimeoutSeconds`, or at once if it stops
answering (nothing new reached it since the drain began). The engine's own SIGTERM drain is the
second line of defence. The drain's state is in `status.scaleDown`, so an operator restart resumes it.
"""
from __future__ import annotations

import asyncio
import datetime
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import autoscaler, engine_metrics, render
from .apply import Applier

SETTLE_SECONDS = 3.0  # Endpoints reach the router within about a second; a request may be in transit


@dataclass
class ScalingMemory:
    """Per OrcaDeployment, in the operator's memory: what the stabilization windows look back on."""
    recommendations: deque = field(default_factory=lambda: deque(maxlen=10_000))  # (time, replicas)
    ttft_snapshots: deque = field(default_factory=lambda: deque(maxlen=10_000))  # (time, {replica: buckets})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds_since(stamp: str) -> float:
    then = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


def stage0_pod_ips(ap: Applier, od: render.Obj) -> dict[int, str]:
    """Each replica group's ready stage-0 pod address: the one that schedules and serves metrics."""
    meta = od["metadata"]
    addresses = {}
    for pod in ap.list("v1", "Pod", meta["namespace"], render.engine_selector(meta["name"])):
        labels, status = pod["metadata"].get("labels") or {}, pod.get("status") or {}
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
        if labels.get("orca.dev/stage") == "0" and ready and status.get("podIP") and \
                not pod["metadata"].get("deletionTimestamp"):
            addresses[int(labels[render.REPLICA_LABEL])] = status["podIP"]
    return addresses


def metric_values(policy: autoscaler.Policy, replicas: list[int],
                  samples: dict[int, engine_metrics.EngineSample | None], memory: ScalingMemory,
                  now: float) -> list[float | None]:
    """Per replica for a load metric; one latency (all replicas' histograms together) for the objective."""
    if policy.metric != autoscaler.LATENCY_METRIC:
        gauge = autoscaler.LOAD_METRICS[policy.metric]
        return [samples[r].gauges.get(gauge, 0.0) if samples.get(r) else None for r in replicas]
    current = {r: samples[r].ttft_buckets for r in replicas if samples.get(r)}
    if not current:
        return [None]
    memory.ttft_snapshots.append((now, current))
    if len(memory.ttft_snapshots) == 1:
        return [None]  # one snapshot holds no window yet: hold rather than read "no requests"
    while len(memory.ttft_snapshots) > 1 and now - memory.ttft_snapshots[1][0] >= policy.latency_window_seconds:
        memory.ttft_snapshots.popleft()  # keep the newest snapshot at least a window old
    _, oldest = memory.ttft_snapshots[0]
    combined: dict[float, float] = {}
    for replica, buckets in current.items():
        for bound, count in autoscaler.bucket_increase(buckets, oldest.get(replica)):
            combined[bound] = combined.get(bound, 0.0) + count
    p90 = autoscaler.histogram_quantile(0.9, sorted(combined.items()))
    return [p90 if p90 is not None else 0.0]  # no request in the window: no latency to fix


async def autoscale_step(body: kopf.Body, patch: kopf.Patch, memory: ScalingMemory, ap: Applier,
                         logger: Any) -> None:
    spec, status = body["spec"], body.get("status") or {}
    od = {"metadata": dict(body["metadata"]), "spec": dict(spec)}
    policy = autoscaler.Policy.from_spec(spec)
    current = int(spec.get("replicas", 1))
    addresses = await asyncio.to_thread(stage0_pod_ips, ap, od)  # the kubernetes client blocks
    scale_down = status.get("scaleDown")
    if scale_down:
        await _continue_scale_down(body, patch, od, scale_down, addresses, policy, ap, logger)
        return
    replicas = list(range(current))
    samples = await engine_metrics.scrape_all({r: addresses.get(r) for r in replicas})
    now = time.monotonic()
    if not memory.recommendations:  # a fresh operator: the windows start from what is, not from nothing
        memory.recommendations.append((now, current))
    recommendation = autoscaler.recommend(current, metric_values(policy, replicas, samples, memory, now), policy)
    memory.recommendations.append((now, recommendation.replicas))
    horizon = max(policy.scale_up_window_seconds, policy.scale_down_window_seconds)
    while memory.recommendations and now - memory.recommendations[0][0] > horizon:
        memory.recommendations.popleft()
    desired = autoscaler.stabilize(current, memory.recommendations, now, policy)
    patch.status["desiredReplicas"] = desired
    patch.status["autoscaler"] = {"metric": policy.metric, "value": recommendation.value, "target": policy.target,
                                  "reason": recommendation.reason}
    if desired > current:
        patch.spec["replicas"] = desired
        patch.status["lastScaleTime"] = _now()
        kopf.info(body, reason="ScaledUp", message=f"{current} -> {desired} replicas: {recommendation.reason}")
        logger.info("scaling up %d -> %d: %s", current, desired, recommendation.reason)
    elif desired < current:
        victim = autoscaler.scale_down_victim(current)
        await asyncio.to_thread(label_group, ap, od, victim, True)
        patch.status["scaleDown"] = {"replica": victim, "startedAt": _now()}
        kopf.info(body, reason="ScalingDown", message=f"draining replica {victim} before {current} -> {current - 1} "
                                                       f"replicas: {recommendation.reason}")
        logger.info("draining replica %d for a scale-down: %s", victim, recommendation.reason)


async def _continue_scale_down(body: kopf.Body, patch: kopf.Patch, od: render.Obj, scale_down: render.Obj,
                               addresses: dict[int, str], policy: autoscaler.Policy, ap: Applier, logger: Any) -> None:
    victim, current = int(scale_down["replica"]), int(od["spec"].get("replicas", 1))
    if current != victim + 1:  # someone else changed spec.replicas meanwhile: theirs wins, the drain ends
        if victim < current:
            await asyncio.to_thread(label_group, ap, od, victim, False)
        patch.status["scaleDown"] = None
        kopf.info(body, reason="ScaleDownAbandoned", message=f"spec.replicas became {current} while replica {victim} "
                                                             f"drained; it serves again" if victim < current else
                  f"spec.replicas became {current} while replica {victim} drained")
        return
    sample = (await engine_metrics.scrape_all({victim: addresses.get(victim)}))[victim]
    waited = _seconds_since(scale_down["startedAt"])
    if waited < SETTLE_SECONDS and sample is not None:
        return  # requests routed just before the Endpoints changed may still be on their way to it
    if sample is None:
        reason, message = "VictimUnavailable", f"replica {victim} stopped answering while draining (after " \
                                               f"{waited:.0f}s; it had been sent nothing new since the drain began); removed"
    elif sample.in_flight == 0:
        reason, message = "Drained", f"replica {victim} finished its requests in {waited:.0f}s; removed"
    elif waited > policy.drain_timeout_seconds:
        reason, message = "DrainTimeout", f"replica {victim} still had {sample.in_flight:g} requests after " \
                                          f"{waited:.0f}s; removed (its own SIGTERM drain finishes them)"
    else:
        patch.status["autoscaler"] = {**(body.get("status") or {}).get("autoscaler", {}),
                                      "reason": f"draining replica {victim}: {sample.in_flight:g} requests in flight"}
        return
    patch.spec["replicas"] = victim
    patch.status["scaleDown"] = None
    patch.status["desiredReplicas"] = victim
    patch.status["lastScaleTime"] = _now()
    patch.status["autoscaler"] = {**(body.get("status") or {}).get("autoscaler", {}), "reason": message}
    (kopf.warn if reason == "VictimUnavailable" else kopf.info)(body, reason=f"ScaledDown{reason}", message=message)
    logger.info("scale-down: %s", message)


def label_group(ap: Applier, od: render.Obj, replica: int, draining: bool) -> None:
    """Take a replica group's pods out of the engine Service for a drain (or put them back)."""
    meta = od["metadata"]
    selector = f"{render.engine_selector(meta['name'])},{render.REPLICA_LABEL}={replica}"
    for pod in ap.list("v1", "Pod", meta["namespace"], selector):
        ap.patch("v1", "Pod", meta["namespace"], pod["metadata"]["name"], render.draining_patch(draining))
