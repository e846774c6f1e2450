"""Unit tests of the operator's pure render functions: every child from a spec alone."""
from __future__ import annotations

import copy
import filecmp
import json
from pathlib import Path

import pytest

from orca.engine.distributed import contract
from orca.operator import render
from orca.operator.apply import is_subset
from pod_security import restricted_violations

ROOT = Path(__file__).parent.parent


def od(**spec) -> dict:
    return {"metadata": {"name": "m", "namespace": "ns", "uid": "uid-1"},
            "spec": {"model": {"name": "SmolLM2"}, **spec}}


def test_crd_has_one_source_of_truth() -> None:
    assert filecmp.cmp(ROOT / "crds/orcadeployments.orca.dev.yaml",
                       ROOT / "charts/orca/crds/orcadeployments.orca.dev.yaml", shallow=False)


def test_every_child_is_owned_and_labelled() -> None:
    objs = render.children(od(replicas=2, parallelism={"tensor": 2, "pipeline": 3}, ingress={"enabled": True}))
    kinds = [o["kind"] for o in objs]
    assert kinds == ["ConfigMap", "Service", "StatefulSet", "Service", "StatefulSet", "Service", "ServiceAccount",
                     "Role", "RoleBinding", "Deployment", "Service", "PodDisruptionBudget", "Ingress"]
    for o in objs:
        ref = o["metadata"]["ownerReferences"][0]
        assert ref == {"apiVersion": "orca.dev/v1alpha1", "kind": "OrcaDeployment", "name": "m", "uid": "uid-1",
                       "controller": True, "blockOwnerDeletion": True}
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == "m"
        assert o["metadata"]["namespace"] == "ns"


def test_statefulset_places_pipeline_stages_with_tensor_gpus() -> None:
    sts = render.statefulset(od(parallelism={"tensor": 4, "pipeline": 3}), 1)
    assert sts["metadata"]["name"] == "m-r1" and sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == "m-r1"
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    assert c["env"][:len(contract.pod_env(4, 3, "m-r1", "ns"))] == contract.pod_env(4, 3, "m-r1", "ns")
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ORCA_TP"] == "4" and env["ORCA_PP"] == "3" and env["ORCA_MASTER_ADDR"] == "m-r1-0.m-r1.ns.svc"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": render.PORT, "master": contract.DEFAULT_MASTER_PORT,
                     **{f"worker-{t}": contract.DEFAULT_WORKER_PORT + t for t in range(4)}}
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["terminationGracePeriodSeconds"] > render.DRAIN_SECONDS + render.PRESTOP_SECONDS
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(render.PRESTOP_SECONDS)]
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["orca.dev/replica"] == "1"
    assert sts["spec"]["selector"]["matchLabels"] == sts["spec"]["template"]["metadata"]["labels"]


def test_api_key_is_appended_to_the_contract_env() -> None:
    c = render.statefulset(od(apiKeySecretRef={"name": "keys"}), 0)["spec"]["template"]["spec"]["containers"][0]
    assert c["env"][:len(contract.pod_env(1, 1, "m-r0", "ns"))] == contract.pod_env(1, 1, "m-r0", "ns")
    assert {"name": "ORCA_API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}}} in c["env"]


def test_engine_service_routes_only_to_stage_0_of_serving_replicas() -> None:
    o = od(parallelism={"tensor": 1, "pipeline": 3})
    selector = render.engine_service(o)["spec"]["selector"]
    assert selector == {**render.labels("m", "engine"), contract.STAGE_LABEL: "0", render.SERVING_LABEL: "true"}
    template_labels = render.statefulset(o, 0)["spec"]["template"]["metadata"]["labels"]
    assert contract.STAGE_LABEL not in template_labels  # every stage shares the template; the operator labels pods
    assert render.ENGINE_POD_LABELS.items() <= template_labels.items()


def pod(name: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "labels": {"app.kubernetes.io/component": "engine", **labels}}}


SERVES = {render.SERVING_LABEL: "true"}


@pytest.mark.parametrize("labels,expected", [
    ({}, {"metadata": {"labels": {contract.STAGE_LABEL: "2", **SERVES}}}),
    ({contract.STAGE_LABEL: "0", **SERVES}, {"metadata": {"labels": {contract.STAGE_LABEL: "2"}}}),
    ({contract.STAGE_LABEL: "2", **SERVES}, None),
])
def test_engine_pod_label_patch(labels: dict, expected: dict | None) -> None:
    assert render.engine_pod_label_patch(pod("m-r1-2", **labels)) == expected


def test_a_draining_groups_pods_serve_no_more_even_once_recreated() -> None:
    labelled = {contract.STAGE_LABEL: "0", render.REPLICA_LABEL: "1", **SERVES}
    assert render.engine_pod_label_patch(pod("m-r1-0", **labelled), draining_replica=1) == {
        "metadata": {"labels": {render.SERVING_LABEL: "false"}}}
    fresh = {render.REPLICA_LABEL: "1"}  # the StatefulSet recreated a pod of the draining group
    assert render.engine_pod_label_patch(pod("m-r1-0", **fresh), draining_replica=1)["metadata"]["labels"][
        render.SERVING_LABEL] == "false"
    assert render.engine_pod_label_patch(pod("m-r0-0", **{**labelled, render.REPLICA_LABEL: "0"}), 1) is None


def test_a_group_beyond_replicas_or_marked_draining_serves_no_more_and_a_terminating_pod_is_left_be() -> None:
    labelled = {contract.STAGE_LABEL: "0", render.REPLICA_LABEL: "2", **SERVES}
    assert render.engine_pod_label_patch(pod("m-r2-0", **labelled), replicas=2) == {
        "metadata": {"labels": {render.SERVING_LABEL: "false"}}}
    assert render.engine_pod_label_patch(pod("m-r2-0", **labelled), replicas=3) is None
    marked = pod("m-r2-0", **labelled)
    marked["metadata"]["annotations"] = render.draining_patch(True)["metadata"]["annotations"]
    assert render.engine_pod_label_patch(marked, replicas=3)["metadata"]["labels"][render.SERVING_LABEL] == "false"
    terminating = pod("m-r2-0", **{**labelled, render.SERVING_LABEL: "false"})
    terminating["metadata"]["deletionTimestamp"] = "2026-12-02T00:00:00Z"
    assert render.engine_pod_label_patch(terminating, replicas=3) is None
    assert render.draining_patch(False)["metadata"]["annotations"] == {render.DRAINING_ANNOTATION: None}


def test_engine_pod_label_patch_of_a_pod_without_labels() -> None:
    assert render.engine_pod_label_patch({"metadata": {"name": "m-r0-0"}}) == {"metadata": {"labels": {
        contract.STAGE_LABEL: "0", **SERVES}}}


def test_engine_pod_label_patch_needs_an_ordinal() -> None:
    with pytest.raises(ValueError, match="ORCA_POD_NAME"):
        render.engine_pod_label_patch(pod("m-r1-x"))


def test_cpu_only_resources_are_taken_as_given() -> None:
    sts = render.statefulset(od(resources={"requests": {"cpu": 2, "memory": "4Gi"}}), 0)
    assert sts["spec"]["template"]["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}}


def test_engine_args_and_configmap_follow_the_spec() -> None:
    o = od(engine={"maxBatchSize": 64, "kvCacheMemory": "2GiB", "preemption": "recompute", "prefixCaching": False,
                   "args": ["--block-size", "32"]},
           model={"name": "llama", "source": "path", "pvc": {"claimName": "models", "path": "llama.gguf"}})
    args = render.engine_args(o["spec"])
    assert args[:2] == ["serve", "--host"] and "--no-prefix-caching" in args and args[-2:] == ["--block-size", "32"]
    assert args[args.index("--max-batch-size") + 1] == "64" and args[args.index("--model") + 1] == "/models/llama.gguf"
    assert json.loads(render.configmap(o)["data"]["args.json"]) == args
    pod = render.statefulset(o, 0)["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]


@pytest.mark.parametrize("spec,allowed", [
    ({}, []), ({"parallelism": {"tensor": 3, "pipeline": 2}}, []),
    ({"model": {"name": "x", "source": "path", "pvc": {"claimName": "models"}}}, []),
    # a model on a node's directory needs a namespace that admits hostPath (README says so)
    ({"model": {"name": "x", "source": "path", "hostPath": "/srv/models"}},
     ["volume model: hostPath volumes are not allowed"]),
])
def test_every_pod_template_meets_the_restricted_pod_security_standard(spec: dict, allowed: list[str]) -> None:
    o = od(**spec)
    templates = [child["spec"]["template"]["spec"] for child in render.children(o) if "template" in child.get("spec", {})]
    assert len(templates) == int(o["spec"].get("replicas", 1)) + 1  # the engines' StatefulSets and the router
    for pod in templates:
        assert restricted_violations(pod) == allowed
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HOME"] == "/tmp" and {"name": "scratch", "mountPath": "/tmp"} in container["volumeMounts"]
    # the check itself fails a pod that lacks any one field
    bad = copy.deepcopy(templates[0])
    del bad["containers"][0]["securityContext"]["capabilities"]
    assert restricted_violations(bad) == ["containers[0] (engine): capabilities must drop ALL and add none", *allowed]


def test_router_reads_only_its_engine_endpoints() -> None:
    o = od()
    deployment = render.router_deployment(o)["spec"]["template"]["spec"]
    assert deployment["serviceAccountName"] == "m-router"
    args = deployment["containers"][0]["args"]
    assert args[args.index("--service") + 1] == "m-engine" and args[args.index("--namespace") + 1] == "ns"
    assert args[args.index("--tokenizer") + 1] == "bundled" and "--no-prefix-affinity" not in args
    scored = render.router_args(od(router={"scoring": {"waitingWeight": 2, "kvCacheWeight": 0, "prefixAffinity": False}},
                                   engine={"blockSize": 32}))
    assert scored[scored.index("--waiting-weight") + 1] == "2" and scored[scored.index("--kv-cache-weight") + 1] == "0"
    assert "--no-prefix-affinity" in scored and scored[scored.index("--block-size") + 1] == "32"
    defaulted = render.router_args(od(router={"scoring": {"waitingWeight": 3}}),
                                   render.parse_router_scoring('{"waitingWeight": 1.5, "affinityBound": 8}'))
    assert defaulted[defaulted.index("--waiting-weight") + 1] == "3"  # the spec overrides the chart's default
    assert defaulted[defaulted.index("--affinity-bound") + 1] == "8"
    for bad, field in (('{"nope": 1}', "keys among"), ('{"kvCacheWeight": -1}', "kvCacheWeight"),
                       ('{"prefixAffinity": 1}', "prefixAffinity"), ("[", "not JSON")):
        with pytest.raises(render.SpecError, match=field):
            render.parse_router_scoring(bad)
    path_model = od(model={"name": "x", "source": "path", "hostPath": "/srv", "path": "m.gguf"})
    assert render.router_args(path_model)[render.router_args(path_model).index("--tokenizer") + 1] == "/models/m.gguf"
    router_pod = render.router_deployment(path_model)["spec"]["template"]["spec"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in router_pod["containers"][0]["volumeMounts"]
    assert render.router_role(o)["rules"] == [{"apiGroups": [""], "resources": ["endpoints"],
                                               "verbs": ["get", "list", "watch"], "resourceNames": ["m-engine"]}]
    binding = render.router_role_binding(o)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "m-router", "namespace": "ns"}]


def test_router_ingress_pdb() -> None:
    o = od(router={"replicas": 3}, ingress={"enabled": True, "host": "llm.example.com", "className": "nginx",
                                           "tlsSecretName": "tls"})
    assert render.router_deployment(o)["spec"]["replicas"] == 3
    ing = render.ingress(o)
    assert ing["spec"]["ingressClassName"] == "nginx" and ing["spec"]["tls"][0]["hosts"] == ["llm.example.com"]
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == {"name": "m", "port": {"number": 8000}}
    assert render.ingress(od()) is None
    assert render.pdb(o, "policy/v1beta1")["apiVersion"] == "policy/v1beta1"
    assert render.endpoint(o) == "http://m.ns.svc:8000"


@pytest.mark.parametrize("spec,field", [
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas"),
    ({"parallelism": {"tensor": 3}, "model": {"name": "x", "numKeyValueHeads": 2}}, "numKeyValueHeads"),
    ({"model": {"name": "x", "source": "path"}}, "model.pvc"),
    ({"parallelism": {"tensor": 2}}, "numAttentionHeads"),  # the bundled model has 9 heads, 3 KV heads
])
def test_cross_field_rules(spec: dict, field: str) -> None:
    with pytest.raises(render.SpecError, match=field):
        render.validate(od(**spec)["spec"])
    render.validate(od()["spec"])


def test_subset_comparison_ignores_server_defaults_but_not_edits() -> None:
    want = {"spec": {"replicas": 2, "ports": [{"port": 8000}]}}
    assert is_subset(want, {"spec": {"replicas": 2, "ports": [{"port": 8000, "protocol": "TCP"}], "x": 1}})
    assert not is_subset(want, {"spec": {"replicas": 3, "ports": [{"port": 8000}]}})
    assert not is_subset(want, {"spec": {"replicas": 2, "ports": []}})
