"""Pure functions from an OrcaDeployment to the objects it owns. No API calls here, so every
child can be unit-tested from a spec alone; `apply.py` is the one place that talks to the cluster.

Placement: each engine replica is a StatefulSet of `pipeline` pods (ordinal = pipeline stage),
each pod asking for `tensor` GPUs so tensor parallelism stays inside one node, with preferred
anti-affinity spreading a replica's stages across nodes and a headless Service giving stages
stable addresses (`<sts>-<stage>.<sts>`), which the distributed runtime uses to find stage 0.
What an engine pod is told about its place is `orca.engine.distributed.contract`, shared with the workers.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from orca.engine.distributed import contract

Obj = dict[str, Any]

GROUP, VERSION, PLURAL, KIND = "orca.dev", "v1alpha1", "orcadeployments", "OrcaDeployment"
DEFAULT_IMAGE = "ghcr.io/orca-serve/orca:0.1.0"
PORT = 8000
# Head counts of the bundled SmolLM2-135M, so TP is checked for it without reading the model.
BUNDLED_HEADS = {"numAttentionHeads": 9, "numKeyValueHeads": 3}
DRAIN_SECONDS = 30
PRESTOP_SECONDS = 5
STARTUP_SECONDS = 600  # the longest an engine may take to load its model before the kubelet restarts it
# The image's non-root user (distroless' "nonroot"), numeric so the kubelet can check runAsNonRoot.
RUN_AS_USER = 65532
SCRATCH = "/tmp"
REPLICA_LABEL = "orca.dev/replica"
# "false" on the pods of a replica group being drained for a scale-down: the engine Service stops
# selecting them, so the router (and any other client of the Service) sends them nothing new.
SERVING_LABEL = "orca.dev/serving"
DRAINING_ANNOTATION = "orca.dev/draining"  # the one writable path of every pod: HOME and caches live here


def pod_security_context() -> Obj:
    """Pod Security Standards "restricted": what a hardened namespace admits."""
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> Obj:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True}


def _harden(pod: Obj, container: Obj) -> None:
    """Restricted security contexts, and an emptyDir at SCRATCH for what the process writes (a read-only
    root filesystem leaves nothing else writable): HOME, and with it the compiled-kernel and model caches."""
    pod["securityContext"] = pod_security_context()
    container["securityContext"] = container_security_context()
    pod.setdefault("volumes", []).append({"name": "scratch", "emptyDir": {}})
    container.setdefault("volumeMounts", []).append({"name": "scratch", "mountPath": SCRATCH})
    container.setdefault("env", []).extend([{"name": "HOME", "value": SCRATCH}, {"name": "TMPDIR", "value": SCRATCH}])


class SpecError(ValueError):
    """A spec the schema accepts but that cannot be realised (cross-field rules)."""


def parse_router_scoring(text: str) -> Obj:
    """The operator's --router-scoring: a JSON object with the keys of spec.router.scoring."""
    try:
        scoring = json.loads(text or "{}")
    except ValueError as e:
        raise SpecError(f"--router-scoring is not JSON: {e}") from None
    if not isinstance(scoring, dict) or set(scoring) - set(ROUTER_SCORING_KEYS):
        raise SpecError(f"--router-scoring takes an object with keys among {', '.join(ROUTER_SCORING_KEYS)}; "
                        f"got {text!r}")
    for key, value in scoring.items():
        if key == "prefixAffinity" and not isinstance(value, bool) or \
                key != "prefixAffinity" and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise SpecError(f"--router-scoring: {key} must be {'true or false' if key == 'prefixAffinity' else 'a number >= 0'}")
    return scoring


def validate(spec: Obj) -> None:
    """Rules OpenAPI validation cannot express; raised as `Degraded` with this message."""
    auto = spec.get("autoscaling") or {}
    if auto.get("enabled") and auto.get("minReplicas", 1) > auto.get("maxReplicas", 1):
        raise SpecError(f"autoscaling.minReplicas ({auto.get('minReplicas', 1)}) must not exceed "
                        f"autoscaling.maxReplicas ({auto.get('maxReplicas', 1)})")
    tp = parallelism(spec)[0]
    model = spec["model"]
    known = BUNDLED_HEADS if model.get("source", "bundled") == "bundled" else {}
    for field in ("numAttentionHeads", "numKeyValueHeads"):
        heads = model.get(field) or known.get(field)
        if heads and heads % tp:
            raise SpecError(f"parallelism.tensor ({tp}) must divide model.{field} ({heads})")
    if model.get("source", "bundled") == "path" and not (model.get("pvc") or model.get("hostPath")):
        raise SpecError("model.source=path needs model.pvc or model.hostPath")


def parallelism(spec: Obj) -> tuple[int, int]:
    p = spec.get("parallelism") or {}
    return int(p.get("tensor", 1)), int(p.get("pipeline", 1))


def labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "orca", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "orca-operator",
            "app.kubernetes.io/part-of": "orca"}


# The labels every engine pod of every OrcaDeployment carries: what the operator's pod watch filters on.
ENGINE_POD_LABELS = {"app.kubernetes.io/component": "engine", "app.kubernetes.io/managed-by": "orca-operator"}


def engine_selector(name: str) -> str:
    """Label selector of all engine pods: what the scale subresource reports."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels(name, "engine").items()))


def _meta(od: Obj, name: str, component: str, extra_labels: dict[str, str] | None = None) -> Obj:
    meta = od["metadata"]
    return {"name": name, "namespace": meta["namespace"], "labels": {**labels(meta["name"], component),
                                                                     **(extra_labels or {})},
            "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                                 "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]}


def engine_args(spec: Obj) -> list[str]:
    e, model = spec.get("engine") or {}, spec["model"]
    args = ["serve", "--host", "0.0.0.0", "--port", str(PORT), "--served-model-name", model["name"],
            "--dtype", model.get("dtype", "auto"), "--drain-timeout", str(DRAIN_SECONDS)]
    if model.get("source", "bundled") == "path":
        args += ["--model", _model_path(model)]
    flags = {"maxBatchSize": "--max-batch-size", "maxNumBatchedTokens": "--max-num-batched-tokens",
             "kvCacheMemory": "--kv-cache-memory", "blockSize": "--block-size", "preemption": "--preemption"}
    for key, flag in flags.items():
        if key in e:
            args += [flag, str(e[key])]
    if e.get("prefixCaching") is False:
        args.append("--no-prefix-caching")
    return args + list(e.get("args") or [])


def _model_path(model: Obj) -> str:
    return f"/models/{model.get('path') or (model.get('pvc') or {}).get('path') or ''}".rstrip("/")


def _model_volume(model: Obj) -> tuple[Obj, Obj] | None:
    """The volume and read-only mount of a model from a path (source=path), or None for the bundled one."""
    if model.get("source", "bundled") != "path":
        return None
    volume = ({"name": "model", "persistentVolumeClaim": {"claimName": model["pvc"]["claimName"], "readOnly": True}}
              if model.get("pvc") else {"name": "model", "hostPath": {"path": model["hostPath"]}})
    return volume, {"name": "model", "mountPath": "/models", "readOnly": True}


def configmap(od: Obj) -> Obj:
    name = od["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(od, f"{name}-engine", "engine"),
            "data": {"args.json": json.dumps(engine_args(od["spec"])),
                     "parallelism.json": json.dumps(dict(zip(("tensor", "pipeline"), parallelism(od["spec"]))))}}


def group_name(od: Obj, replica: int) -> str:
    return f"{od['metadata']['name']}-r{replica}"


def headless_service(od: Obj, replica: int) -> Obj:
    group = group_name(od, replica)
    selector = {**labels(od["metadata"]["name"], "engine"), REPLICA_LABEL: str(replica)}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(od, group, "engine", {REPLICA_LABEL: str(replica)}),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector,
                     "ports": [{"name": "http", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]}}


def _resources(spec: Obj, tp: int) -> Obj:
    """`tensor` GPUs per pod unless `resources` is given; a `resources` without a GPU is CPU-only."""
    if spec.get("resources") is None:
        return {"limits": {"nvidia.com/gpu": str(tp)}}
    return {k: {rk: str(rv) for rk, rv in v.items()} for k, v in spec["resources"].items() if v}


def statefulset(od: Obj, replica: int) -> Obj:
    spec, name, ns = od["spec"], od["metadata"]["name"], od["metadata"]["namespace"]
    tp, pp = parallelism(spec)
    group = group_name(od, replica)
    pod_labels = {**labels(name, "engine"), REPLICA_LABEL: str(replica)}
    container: Obj = {
        "name": "engine", "image": spec.get("image", DEFAULT_IMAGE), "args": engine_args(spec),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"},
                  {"name": "master", "containerPort": contract.DEFAULT_MASTER_PORT, "protocol": "TCP"},
                  *({"name": f"worker-{rank}", "containerPort": contract.DEFAULT_WORKER_PORT + rank, "protocol": "TCP"}
                    for rank in range(tp))],
        # Engines sharing a node's cores: OpenMP threads that spin while waiting starve the other pods' threads.
        "env": [*contract.pod_env(tp, pp, group, ns), {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": PORT, "scheme": "HTTP"}, "periodSeconds": 2,
                           "failureThreshold": 3, "timeoutSeconds": 2, "successThreshold": 1},
        # Loading a model (and building kernels) takes minutes on a cold node: liveness waits for start-up.
        "startupProbe": {"httpGet": {"path": "/health", "port": PORT, "scheme": "HTTP"}, "periodSeconds": 2,
                         "failureThreshold": STARTUP_SECONDS // 2, "timeoutSeconds": 2, "successThreshold": 1},
        "livenessProbe": {"httpGet": {"path": "/health", "port": PORT, "scheme": "HTTP"}, "periodSeconds": 10,
                          "failureThreshold": 6, "timeoutSeconds": 2, "successThreshold": 1},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
        "resources": _resources(spec, tp),
    }
    if "imagePullPolicy" in spec:
        container["imagePullPolicy"] = spec["imagePullPolicy"]
    if spec.get("apiKeySecretRef"):
        ref = spec["apiKeySecretRef"]
        container["env"].append({"name": "ORCA_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": ref["name"], "key": ref.get("key", "api-key")}}})
    pod: Obj = {"containers": [container], "terminationGracePeriodSeconds": DRAIN_SECONDS + PRESTOP_SECONDS + 10}
    model_volume = _model_volume(spec["model"])
    if model_volume:
        pod["volumes"], container["volumeMounts"] = [model_volume[0]], [model_volume[1]]
    _harden(pod, container)
    spread = {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                 "labelSelector": {"matchLabels": pod_labels}}}
    affinity = copy.deepcopy(spec.get("affinity") or {})
    anti = affinity.setdefault("podAntiAffinity", {})
    anti.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(spread)
    pod["affinity"] = affinity
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        if spec.get(key):
            pod[key] = spec[key]
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": _meta(od, group, "engine", {REPLICA_LABEL: str(replica)}),
            "spec": {"replicas": pp, "serviceName": group, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": pod_labels},
                     "template": {"metadata": {"labels": pod_labels}, "spec": pod}}}


def engine_service(od: Obj) -> Obj:
    """Only stage 0 runs the scheduler and serves HTTP; the other stages are workers it drives."""
    name = od["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(od, f"{name}-engine", "engine"),
            "spec": {"selector": {**labels(name, "engine"), contract.STAGE_LABEL: "0", SERVING_LABEL: "true"},
                     "ports": [{"name": "http", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]}}


def engine_pod_label_patch(pod: Obj, draining_replica: int | None = None, replicas: int | None = None) -> Obj | None:
    """The merge patch that labels an engine pod with its stage and whether it serves, or None when
    it already carries both (or is terminating: it is left as it is).

    A StatefulSet stamps the same template labels on every pod, and Kubernetes before 1.28 adds no
    pod-index label, so the operator labels each pod for the engine Service to select stage 0. A pod
    serves unless it is being drained (its own DRAINING_ANNOTATION, or it belongs to
    `draining_replica`, as a recreated pod of that group does) or its group is beyond `replicas`
    (about to be removed). Raises ValueError for a pod name without an ordinal.
    """
    meta = pod["metadata"]
    if meta.get("deletionTimestamp"):
        return None
    have = meta.get("labels") or {}
    replica = have.get(REPLICA_LABEL)
    drained = (meta.get("annotations") or {}).get(DRAINING_ANNOTATION) == "true" or (
        replica is not None and (replica == str(draining_replica) or (replicas is not None and int(replica) >= replicas)))
    want = {contract.STAGE_LABEL: str(contract.stage_of_pod(meta["name"])), SERVING_LABEL: "false" if drained else "true"}
    changed = {k: v for k, v in want.items() if have.get(k) != v}
    return {"metadata": {"labels": changed}} if changed else None


def draining_patch(draining: bool) -> Obj:
    """Marks (or unmarks) an engine pod as drained for a scale-down, on the pod itself, so no stale
    view of the OrcaDeployment's status can put it back into the engine Service."""
    return {"metadata": {"labels": {SERVING_LABEL: "false" if draining else "true"},
                         "annotations": {DRAINING_ANNOTATION: "true" if draining else None}}}


ROUTER_SCORING_KEYS = ("waitingWeight", "runningWeight", "kvCacheWeight", "prefixAffinity", "affinityBound")


def router_args(od: Obj, scoring_defaults: Obj | None = None) -> list[str]:
    """The router's flags: where its replicas are, and how it scores them: spec.router.scoring over
    the operator's defaults (the chart's `routerScoring` value)."""
    spec, name, namespace = od["spec"], od["metadata"]["name"], od["metadata"]["namespace"]
    scoring = {**(scoring_defaults or {}), **((spec.get("router") or {}).get("scoring") or {})}
    model = spec["model"]
    tokenizer = "bundled" if model.get("source", "bundled") == "bundled" else _model_path(model)
    args = ["router", "--port", str(PORT), "--service", f"{name}-engine", "--namespace", namespace,
            "--block-size", str((spec.get("engine") or {}).get("blockSize", 16)), "--tokenizer", tokenizer]
    flags = {"waitingWeight": "--waiting-weight", "runningWeight": "--running-weight",
             "kvCacheWeight": "--kv-cache-weight", "affinityBound": "--affinity-bound"}
    for key, flag in flags.items():
        if key in scoring:
            args += [flag, str(scoring[key])]
    if scoring.get("prefixAffinity") is False:
        args.append("--no-prefix-affinity")
    return args


def router_name(od: Obj) -> str:
    return f"{od['metadata']['name']}-router"


def router_service_account(od: Obj) -> Obj:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(od, router_name(od), "router")}


def router_role(od: Obj) -> Obj:
    """The router watches its engine Service's Endpoints to know the ready replicas; nothing more."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(od, router_name(od), "router"),
            "rules": [{"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get", "list", "watch"],
                       "resourceNames": [f"{od['metadata']['name']}-engine"]}]}


def router_role_binding(od: Obj) -> Obj:
    name = router_name(od)
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(od, name, "router"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": od["metadata"]["namespace"]}]}


def router_deployment(od: Obj, scoring_defaults: Obj | None = None) -> Obj:
    spec, name = od["spec"], od["metadata"]["name"]
    sel = labels(name, "router")
    container: Obj = {"name": "router", "image": spec.get("image", DEFAULT_IMAGE), "args": router_args(od, scoring_defaults),
                      "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
                      "readinessProbe": {"httpGet": {"path": "/ready", "port": PORT, "scheme": "HTTP"},
                                         "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 2,
                                         "successThreshold": 1},
                      "livenessProbe": {"httpGet": {"path": "/health", "port": PORT, "scheme": "HTTP"},
                                        "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 2,
                                        "successThreshold": 1}}
    pod: Obj = {"serviceAccountName": router_name(od), "containers": [container]}
    model_volume = _model_volume(spec["model"])  # the router reads the model's tokenizer for prefix affinity
    if model_volume:
        pod["volumes"], container["volumeMounts"] = [model_volume[0]], [model_volume[1]]
    _harden(pod, container)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(od, name, "router"),
            "spec": {"replicas": int((spec.get("router") or {}).get("replicas", 1)), "selector": {"matchLabels": sel},
                     "template": {"metadata": {"labels": sel}, "spec": pod}}}


def router_service(od: Obj) -> Obj:
    name = od["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(od, name, "router"),
            "spec": {"selector": labels(name, "router"),
                     "ports": [{"name": "http", "port": PORT, "targetPort": PORT, "protocol": "TCP"}]}}


def ingress(od: Obj) -> Obj | None:
    ing, name = od["spec"].get("ingress") or {}, od["metadata"]["name"]
    if not ing.get("enabled"):
        return None
    rule: Obj = {"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
        "service": {"name": name, "port": {"number": PORT}}}}]}}
    if ing.get("host"):
        rule["host"] = ing["host"]
    spec: Obj = {"rules": [rule]}
    if ing.get("className"):
        spec["ingressClassName"] = ing["className"]
    if ing.get("tlsSecretName"):
        spec["tls"] = [{"hosts": [ing["host"]] if ing.get("host") else [], "secretName": ing["tlsSecretName"]}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": _meta(od, name, "router"), "spec": spec}


def pdb(od: Obj, api_version: str = "policy/v1") -> Obj:
    """At most one engine pod down at a time by voluntary disruption (drains, upgrades)."""
    name = od["metadata"]["name"]
    return {"apiVersion": api_version, "kind": "PodDisruptionBudget", "metadata": _meta(od, f"{name}-engine", "engine"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(name, "engine")}}}


def children(od: Obj, pdb_api_version: str = "policy/v1", router_scoring: Obj | None = None) -> list[Obj]:
    """Everything the OrcaDeployment should own right now, in apply order."""
    replicas = int(od["spec"].get("replicas", 1))
    objs = [configmap(od)]
    for r in range(replicas):
        objs += [headless_service(od, r), statefulset(od, r)]
    objs += [engine_service(od), router_service_account(od), router_role(od), router_role_binding(od),
             router_deployment(od, router_scoring), router_service(od), pdb(od, pdb_api_version)]
    ing = ingress(od)
    return objs + ([ing] if ing else [])


def endpoint(od: Obj) -> str:
    meta = od["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc:{PORT}"


def condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> Obj:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message,
            "observedGeneration": generation}
