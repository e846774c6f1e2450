"""kopf handlers: one reconcile for every event of an OrcaDeployment, plus a timer that repairs
drift (a deleted or hand-edited child) and keeps the status in step with the children; the
autoscaler's timer; and a pod watch that labels each engine pod with its pipeline stage and
whether it serves, which the engine Service selects."""
from __future__ import annotations

import datetime
import functools
from typing import Any

import kopf
from kubernetes import client, config

from . import render
from .apply import Applier
from .scaling import ScalingMemory, autoscale_step, label_group

RESYNC_SECONDS = 5.0
AUTOSCALE_SECONDS = 2.0
ROUTER_SCORING: render.Obj = {}  # the operator's --router-scoring: defaults under each spec.router.scoring


@functools.cache
def applier() -> Applier:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return Applier(client.ApiClient())


@functools.cache
def pdb_api_version() -> str:
    """policy/v1 where served (1.21+), else policy/v1beta1."""
    return "policy/v1" if applier().serves("policy/v1", "PodDisruptionBudget") else "policy/v1beta1"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = 20  # post Events for INFO and above
    settings.persistence.finalizer = "orca.dev/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="orca.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="orca.dev")


@kopf.on.resume(render.GROUP, render.VERSION, render.PLURAL)
@kopf.on.create(render.GROUP, render.VERSION, render.PLURAL)
@kopf.on.update(render.GROUP, render.VERSION, render.PLURAL, field="spec")
@kopf.timer(render.GROUP, render.VERSION, render.PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def reconcile(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    od = {"metadata": dict(body["metadata"]), "spec": dict(body["spec"])}
    generation = body["metadata"].get("generation", 0)
    old = {c["type"]: c for c in (body.get("status") or {}).get("conditions") or []}
    try:
        render.validate(od["spec"])
    except render.SpecError as e:
        if old.get("Degraded", {}).get("message") != str(e):
            kopf.warn(body, reason="InvalidSpec", message=str(e))
        _set_status(patch, old, generation, body, ready_groups=None, error=str(e))
        return
    ap = applier()
    for obj in render.children(od, pdb_api_version(), ROUTER_SCORING):
        if ap.apply(obj) != "unchanged":
            logger.info("%s %s/%s", "applied", obj["kind"], obj["metadata"]["name"])
    groups = _prune_and_count(ap, od)  # before labelling: a group being removed must not serve again
    status = body.get("status") or {}
    if status.get("scaleDown") and not _autoscaling_enabled(body["spec"]):  # turned off mid-drain: serve again
        victim = int(status["scaleDown"]["replica"])
        label_group(ap, od, victim, draining=False)
        patch.status["scaleDown"] = None
        status = {}
    draining, replicas = _draining_replica(status), int(od["spec"].get("replicas", 1))
    for pod in ap.list("v1", "Pod", od["metadata"]["namespace"], render.engine_selector(od["metadata"]["name"])):
        _label_engine_pod(ap, pod, draining, replicas, logger)  # repairs a pod whose event the watch missed
    _set_status(patch, old, generation, body, ready_groups=groups, error=None)


def _autoscaling_enabled(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("enabled"))


@kopf.timer(render.GROUP, render.VERSION, render.PLURAL, interval=AUTOSCALE_SECONDS, initial_delay=AUTOSCALE_SECONDS,
            when=_autoscaling_enabled)
async def autoscale(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """The autoscaler (a timer, as dask-kubernetes runs its own); only while spec.autoscaling.enabled."""
    try:
        render.validate(dict(body["spec"]))
    except render.SpecError:
        return  # reconcile reports it as Degraded
    if "scaling" not in memo:
        memo["scaling"] = ScalingMemory()
    await autoscale_step(body, patch, memo["scaling"], applier(), logger)


@kopf.on.event("", "v1", "pods", labels=render.ENGINE_POD_LABELS)
def label_engine_pod(event: kopf.RawEvent, body: kopf.Body, logger: Any, **_: Any) -> None:
    if event["type"] == "DELETED":
        return
    meta = body["metadata"]
    ap = applier()
    owner = ap.get(f"{render.GROUP}/{render.VERSION}", render.KIND, meta["namespace"],
                   (meta.get("labels") or {}).get("app.kubernetes.io/instance", ""))
    if owner is None:
        return
    _label_engine_pod(ap, {"metadata": dict(meta)}, _draining_replica(owner.get("status")),
                      int(owner["spec"].get("replicas", 1)), logger)


def _draining_replica(status: render.Obj | None) -> int | None:
    scale_down = (status or {}).get("scaleDown")
    return int(scale_down["replica"]) if scale_down else None


def _label_engine_pod(ap: Applier, pod: render.Obj, draining: int | None, replicas: int, logger: Any) -> None:
    """Label one engine pod with its stage and whether it serves; a pod named without an ordinal is
    not a stage and is left be."""
    meta = pod["metadata"]
    try:
        patch = render.engine_pod_label_patch(pod, draining, replicas)
    except ValueError as e:
        logger.warning("engine pod %s/%s: %s", meta["namespace"], meta["name"], e)
        return
    if patch is not None:
        ap.patch("v1", "Pod", meta["namespace"], meta["name"], patch)
        logger.info("labelled Pod/%s %s", meta["name"], patch["metadata"]["labels"])


def _prune_and_count(ap: Applier, od: render.Obj) -> int:
    """Delete replica groups beyond spec.replicas; return how many groups have all stages ready."""
    meta, spec = od["metadata"], od["spec"]
    replicas, pipeline = int(spec.get("replicas", 1)), render.parallelism(spec)[1]
    selector = f"{render.engine_selector(meta['name'])},{render.REPLICA_LABEL}"
    ready = 0
    for sts in ap.list("apps/v1", "StatefulSet", meta["namespace"], selector):
        replica = int(sts["metadata"]["labels"][render.REPLICA_LABEL])
        if replica >= replicas:
            ap.delete("apps/v1", "StatefulSet", meta["namespace"], sts["metadata"]["name"])
            ap.delete("v1", "Service", meta["namespace"], sts["metadata"]["name"])
        elif (sts.get("status") or {}).get("readyReplicas", 0) >= pipeline:
            ready += 1
    ingress = render.ingress(od)
    if ingress is None:
        ap.delete("networking.k8s.io/v1", "Ingress", meta["namespace"], meta["name"])
    return ready


def _set_status(patch: kopf.Patch, old: dict[str, render.Obj], generation: int, body: kopf.Body,
                ready_groups: int | None, error: str | None) -> None:
    spec, name = body["spec"], body["metadata"]["name"]
    desired = int(spec.get("replicas", 1))
    if error is not None:
        conds = [render.condition("Ready", False, "InvalidSpec", error, generation),
                 render.condition("Progressing", False, "InvalidSpec", "nothing is rolled out until the spec is fixed",
                                  generation),
                 render.condition("Degraded", True, "InvalidSpec", error, generation)]
    else:
        ready = ready_groups or 0
        done = ready >= desired
        conds = [render.condition("Ready", done, "AllReplicasReady" if done else "ReplicasNotReady",
                                  f"{ready}/{desired} replica groups ready", generation),
                 render.condition("Progressing", not done, "RollingOut" if not done else "Complete",
                                  f"waiting for {desired - ready} replica groups" if not done else "up to date",
                                  generation),
                 render.condition("Degraded", False, "AsExpected", "spec is valid", generation)]
        patch.status["readyReplicas"] = ready
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for c in conds:  # lastTransitionTime moves only when the status flips (API conventions)
        prev = old.get(c["type"])
        c["lastTransitionTime"] = prev["lastTransitionTime"] if prev and prev.get("status") == c["status"] \
            and prev.get("lastTransitionTime") else now
    current = (body.get("status") or {})
    new = {"replicas": desired, "observedGeneration": generation, "selector": render.engine_selector(name),
           "endpoint": render.endpoint({"metadata": body["metadata"]}), "conditions": conds}
    if error is None:
        new["readyReplicas"] = ready_groups or 0
    if any(current.get(k) != v for k, v in new.items()):
        for k, v in new.items():
            patch.status[k] = v
