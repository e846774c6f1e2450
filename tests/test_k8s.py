"""The CRD, the Helm chart and the operator against a real control plane (tests/k8s/cluster.py).

The chart is installed with Helm's own library (helm-sdkpy); the operator runs as a local
process authenticated as the chart's ServiceAccount, so its RBAC is exercised for real.
Pods are created by the StatefulSet controller but never run: there is no kubelet.
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from dev_cluster_client import wait_for
from k8s.cluster import OPERATOR_NAMESPACE, OPERATOR_SA, OPERATOR_TOKEN
from orca.engine.distributed.contract import STAGE_LABEL

helm = pytest.importorskip("helm_sdkpy", reason="installed by `make` (pip --ignore-requires-python helm-sdkpy)")

pytestmark = [pytest.mark.slow, pytest.mark.k8s]
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # the test cluster's self-signed cert
ROOT = Path(__file__).parent.parent
CHART = str(ROOT / "charts/orca")
G, V, P = "orca.dev", "v1alpha1", "orcadeployments"
NS = "default"


@pytest.fixture(scope="module")
def api(k8s) -> client.ApiClient:
    return config.new_client_from_config(str(k8s.kubeconfig()))


@pytest.fixture(scope="module")
def release(k8s, api):
    cfg = helm.Configuration(namespace=OPERATOR_NAMESPACE, kubeconfig=str(k8s.kubeconfig()))
    lint = asyncio.run(helm.Lint(cfg).run(CHART))
    assert not [m for m in lint.get("messages", []) if "error" in str(m).lower()], lint
    asyncio.run(helm.Install(cfg).run("orca", CHART, values={"serviceAccount": {"name": OPERATOR_SA}},
                                      create_namespace=True, wait=False))
    wait_for("the CRD to be established", lambda: any(
        c.type == "Established" and c.status == "True" for c in client.ApiextensionsV1Api(api)
        .read_custom_resource_definition("orcadeployments.orca.dev").status.conditions or []))
    yield cfg


@pytest.fixture(scope="module")
def operator(k8s, release):
    """`orca operator` with the operator ServiceAccount's identity; restartable by the tests."""
    class Proc:
        def __init__(self) -> None:
            self.proc: subprocess.Popen | None = None

        def start(self) -> None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "KUBECONFIG": str(k8s.kubeconfig(OPERATOR_TOKEN, "operator")), "PYTHONSAFEPATH": "1"}
            self.log = open(k8s.workdir / "operator.log", "a")
            self.proc = subprocess.Popen([sys.executable, "-m", "orca.engine.cli", "operator", "--liveness",
                                          f"http://127.0.0.1:{port}/healthz"], env=env, stdout=self.log,
                                         stderr=subprocess.STDOUT)

        def stop(self) -> None:
            if self.proc and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()

    p = Proc()
    p.start()
    yield p
    p.stop()


def example(name: str, **spec_overrides: Any) -> dict:
    body = yaml.safe_load((ROOT / "charts/orca/examples/orcadeployment.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"].update(spec_overrides)
    return body


def od_status(api, name: str) -> dict:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(G, V, NS, P, name).get("status") or {}


def conditions(api, name: str) -> dict[str, dict]:
    return {c["type"]: c for c in od_status(api, name).get("conditions", [])}


def statefulsets(api, name: str) -> dict[str, Any]:
    items = client.AppsV1Api(api).list_namespaced_stateful_set(
        NS, label_selector=f"app.kubernetes.io/instance={name}").items
    return {s.metadata.name: s for s in items}


def test_invalid_specs_are_rejected_by_the_api_server_naming_the_field(api, release) -> None:
    objs = client.CustomObjectsApi(api)
    for spec, field in ((example("bad1", parallelism={"tensor": 0})["spec"], "spec.parallelism.tensor"),
                        ({"model": {"name": "x", "source": "s3"}}, "spec.model.source"),
                        ({"model": {"name": "x"}, "replicas": "two"}, "spec.replicas"),
                        ({"parallelism": {"tensor": 1}}, "spec.model"),
                        ({"model": {"name": "x"}, "autoscaling": {"minReplicas": 0}}, "spec.autoscaling.minReplicas")):
        body = {"apiVersion": f"{G}/{V}", "kind": "OrcaDeployment", "metadata": {"name": "bad"}, "spec": spec}
        with pytest.raises(ApiException) as e:
            objs.create_namespaced_custom_object(G, V, NS, P, body)
        assert e.value.status == 422 and field in e.value.body, e.value.body


def test_operator_lifecycle(api, k8s, operator) -> None:
    objs, apps, core = client.CustomObjectsApi(api), client.AppsV1Api(api), client.CoreV1Api(api)
    objs.create_namespaced_custom_object(G, V, NS, P, example("smol"))
    # children with owner references
    sts = wait_for("two engine StatefulSets", lambda: len(statefulsets(api, "smol")) == 2 and statefulsets(api, "smol"))
    assert set(sts) == {"smol-r0", "smol-r1"}
    # the status is written once a reconcile has applied every child, so the reads below do not race it
    wait_for("the first status", lambda: od_status(api, "smol").get("conditions"))
    uid = objs.get_namespaced_custom_object(G, V, NS, P, "smol")["metadata"]["uid"]
    for s in sts.values():
        assert s.metadata.owner_references[0].uid == uid and s.spec.replicas == 2
    assert apps.read_namespaced_deployment("smol", NS).metadata.owner_references[0].uid == uid
    assert core.read_namespaced_service("smol-r0", NS).spec.cluster_ip == "None"
    assert core.read_namespaced_config_map("smol-engine", NS).data["args.json"]
    pdb_version = "policy/v1" if "policy/v1" in [f"{g.name}/{v.version}" for g in client.ApisApi(api).get_api_versions()
                                                 .groups for v in g.versions] else "policy/v1beta1"
    pdbs = DynamicClient(api).resources.get(api_version=pdb_version, kind="PodDisruptionBudget")
    assert pdbs.get(name="smol-engine", namespace=NS).spec.maxUnavailable == 1
    engine_pods = "app.kubernetes.io/instance=smol,app.kubernetes.io/component=engine"
    wait_for("pods created by the StatefulSet controller", lambda: len(core.list_namespaced_pod(
        NS, label_selector=engine_pods).items) == 4)

    # the operator labels every engine pod with its stage (its ordinal); the engine Service selects stage 0
    def stages() -> dict[str, str | None]:
        return {p.metadata.name: (p.metadata.labels or {}).get(STAGE_LABEL)
                for p in core.list_namespaced_pod(NS, label_selector=engine_pods).items}

    wait_for("every engine pod labelled with its stage", lambda: all(
        stage == name.rsplit("-", 1)[1] for name, stage in stages().items()))
    assert sorted(stages().items()) == [("smol-r0-0", "0"), ("smol-r0-1", "1"), ("smol-r1-0", "0"), ("smol-r1-1", "1")]
    assert core.read_namespaced_service("smol-engine", NS).spec.selector[STAGE_LABEL] == "0"
    # status and conditions
    st = wait_for("status", lambda: od_status(api, "smol").get("conditions") and od_status(api, "smol"))
    assert st["replicas"] == 2 and st["readyReplicas"] == 0 and st["endpoint"] == "http://smol.default.svc:8000"
    assert "app.kubernetes.io/component=engine" in st["selector"]
    c = conditions(api, "smol")
    assert c["Ready"]["status"] == "False" and c["Progressing"]["status"] == "True" and c["Degraded"]["status"] == "False"

    # kubectl scale through the scale subresource
    objs.patch_namespaced_custom_object_scale(G, V, NS, P, "smol", {"spec": {"replicas": 3}})
    wait_for("a third replica group", lambda: "smol-r2" in statefulsets(api, "smol"))
    scale = objs.get_namespaced_custom_object_scale(G, V, NS, P, "smol")
    assert scale["spec"]["replicas"] == 3
    wait_for("status.replicas 3", lambda: od_status(api, "smol").get("replicas") == 3)

    # a deleted child comes back; a hand edit is reverted
    apps.delete_namespaced_stateful_set("smol-r0", NS)
    wait_for("smol-r0 to be recreated", lambda: "smol-r0" in statefulsets(api, "smol")
             and statefulsets(api, "smol")["smol-r0"].metadata.deletion_timestamp is None)
    apps.patch_namespaced_deployment("smol", NS, {"spec": {"replicas": 5}})
    wait_for("router replicas put back", lambda: apps.read_namespaced_deployment("smol", NS).spec.replicas == 1)

    # a spec change rolls out; scale-in removes groups
    objs.patch_namespaced_custom_object(G, V, NS, P, "smol", {"spec": {"engine": {"maxBatchSize": 32}, "replicas": 1}})

    def rolled() -> bool:
        s = statefulsets(api, "smol")
        args = s["smol-r0"].spec.template.spec.containers[0].args if "smol-r0" in s else []
        return set(s) == {"smol-r0"} and args[args.index("--max-batch-size") + 1] == "32"

    wait_for("the new engine args and scale-in", rolled)

    # an operator restart changes nothing that is already right
    time.sleep(2 * 5)  # let one resync settle
    def snapshot() -> dict[str, Any]:
        s = statefulsets(api, "smol")
        return {"sts": {k: v.metadata.generation for k, v in s.items()},
                "deploy": apps.read_namespaced_deployment("smol", NS).metadata.generation,
                "cm": core.read_namespaced_config_map("smol-engine", NS).metadata.resource_version,
                "svc": sorted((x.metadata.name, x.metadata.resource_version) for x in core.list_namespaced_service(
                    NS, label_selector="app.kubernetes.io/instance=smol").items)}
    before = snapshot()
    operator.stop()
    operator.start()
    time.sleep(3 * 5)
    assert snapshot() == before

    # deleting the resource garbage-collects every child
    objs.delete_namespaced_custom_object(G, V, NS, P, "smol")
    wait_for("garbage collection", lambda: not statefulsets(api, "smol") and not core.list_namespaced_service(
        NS, label_selector="app.kubernetes.io/instance=smol").items, timeout=90)


def test_cross_field_error_degrades_with_an_event_and_creates_nothing(api, operator) -> None:
    objs = client.CustomObjectsApi(api)
    objs.create_namespaced_custom_object(G, V, NS, P, example(
        "wrong", autoscaling={"enabled": True, "minReplicas": 4, "maxReplicas": 2}))
    c = wait_for("Degraded", lambda: conditions(api, "wrong").get("Degraded", {}).get("status") == "True"
                 and conditions(api, "wrong"))
    assert c["Degraded"]["reason"] == "InvalidSpec" and "minReplicas" in c["Degraded"]["message"]
    assert c["Ready"]["status"] == "False"
    events = wait_for("a Warning event", lambda: [e for e in client.CoreV1Api(api).list_namespaced_event(NS).items
                                                  if e.involved_object.name == "wrong" and e.type == "Warning"])
    assert "minReplicas" in events[0].message
    time.sleep(2)
    assert statefulsets(api, "wrong") == {}
    objs.delete_namespaced_custom_object(G, V, NS, P, "wrong")


def test_operator_rbac_is_enough_and_no_more(api, release) -> None:
    authz = client.AuthorizationV1Api(api)
    user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"

    def can(verb: str, resource: str, group: str = "", sub: str | None = None) -> bool:
        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user=user, groups=["system:serviceaccounts"], resource_attributes=client.V1ResourceAttributes(
                namespace=NS, verb=verb, resource=resource, group=group, subresource=sub)))
        return authz.create_subject_access_review(review).status.allowed

    assert can("create", "statefulsets", "apps") and can("patch", "orcadeployments", G, "status")
    assert can("create", "events") and can("delete", "services")
    assert all(can(verb, "pods") for verb in ("get", "list", "watch", "patch"))  # to label engine pods' stage
    # each router's own ServiceAccount and Role to read its Endpoints, which the operator must hold to grant
    assert can("create", "serviceaccounts") and can("create", "roles", "rbac.authorization.k8s.io")
    assert can("create", "rolebindings", "rbac.authorization.k8s.io") and can("watch", "endpoints")
    assert not can("create", "endpoints") and not can("create", "clusterrolebindings", "rbac.authorization.k8s.io")
    assert not can("get", "secrets") and not can("create", "pods") and not can("delete", "pods")
    assert not can("delete", "orcadeployments", G)
    assert not can("create", "clusterroles", "rbac.authorization.k8s.io")


def test_helm_upgrade_and_uninstall(api, release) -> None:
    asyncio.run(helm.Upgrade(release).run("orca", CHART, values={
        "serviceAccount": {"name": OPERATOR_SA}, "operator": {"watchNamespaces": ["default"]}}, wait=False))
    dep = client.AppsV1Api(api).read_namespaced_deployment("orca-orca-operator", OPERATOR_NAMESPACE)
    assert "--namespace=default" in dep.spec.template.spec.containers[0].args
    asyncio.run(helm.Uninstall(release).run("orca", wait=False))
    wait_for("the operator Deployment to go", lambda: not client.AppsV1Api(api).list_namespaced_deployment(
        OPERATOR_NAMESPACE, label_selector="app.kubernetes.io/instance=orca").items)
