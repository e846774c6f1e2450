"""The whole system on one machine, end to end: `orca dev cluster up`, `helm install` of the chart, an
OrcaDeployment with two replicas, and requests from the official openai client through the router.

Nothing here is started by the test except the cluster itself: the operator pod comes from the
chart's Deployment, the engine and router pods from what the operator renders, and the node agent
runs them all as processes on their own loopback addresses. Timings (helm install to the first
answer, pod deletion to Ready again) are printed for the closing note (`pytest -s`).
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from orca.operator.dev import cluster as dev_cluster
from orca.operator.dev.processes import alive
from pod_security import restricted_violations

helm = pytest.importorskip("helm_sdkpy", reason="installed by `make` (pip --ignore-requires-python helm-sdkpy)")

# the dev API server's certificate is its own
pytestmark = [pytest.mark.slow, pytest.mark.k8s,
              pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")]
ROOT = Path(__file__).parent.parent
NS, NAME, MODEL = "default", "smol", "SmolLM2-135M-Instruct"
G, V, P = "orca.dev", "v1alpha1", "orcadeployments"
ENGINES = f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=engine"
TIMINGS: dict[str, float] = {}
PROMPTS = ["Say hi", "Name a colour", "Count to three", "What is 2+2?", "Name a fruit"]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except ApiException as e:
            if e.status != 404:
                raise
            result = None
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("dev-cluster")
    plane = dev_cluster.up(state)
    yield plane
    dev_cluster.down(state)


@pytest.fixture(scope="module")
def core(cluster) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(str(cluster.state_dir / "admin.kubeconfig")))


def pods(core: client.CoreV1Api, selector: str, namespace: str = NS) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=selector).items


def ready(pod: client.V1Pod) -> bool:
    return pod.metadata.deletion_timestamp is None and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def engine_pod(core: client.CoreV1Api, name: str) -> client.V1Pod:
    return core.read_namespaced_pod(name, NS)


def router_url(core: client.CoreV1Api) -> str:
    """The router Service's endpoint (there is no kube-proxy here: clients use the pod address)."""
    endpoints = core.read_namespaced_endpoints(NAME, NS)
    return f"http://{endpoints.subsets[0].addresses[0].ip}:8000"


def router_counts(url: str) -> dict[str, float]:
    """Router requests answered 200, by replica (the pod name)."""
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("orca:router_requests_total{") and 'code="200"' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            counts[replica] = counts.get(replica, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def chat(base_url: str, prompt: str, max_tokens: int = 16) -> str:
    answer = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
    return answer.choices[0].message.content


def test_helm_install_runs_the_operator_and_two_engines_become_ready(cluster, core) -> None:
    started = time.monotonic()
    TIMINGS["helm_install"] = started
    cfg = helm.Configuration(namespace="orca-system", kubeconfig=str(cluster.state_dir / "admin.kubeconfig"))
    asyncio.run(helm.Install(cfg).run("orca", str(ROOT / "charts/orca"), create_namespace=True, wait=False))
    # the chart's own Deployment runs the operator, through the scheduler and the node agent
    operator_pod = wait_for("the operator pod Ready", lambda: next(
        (p for p in pods(core, "app.kubernetes.io/name=orca-operator", "orca-system") if ready(p)), None), timeout=120)
    assert operator_pod.spec.node_name == "orca-dev" and operator_pod.status.pod_ip.startswith("127.0.")
    spec = client.ApiClient().sanitize_for_serialization(operator_pod.spec)
    assert restricted_violations(spec) == []

    body = yaml.safe_load((ROOT / "charts/orca/examples/one-machine.yaml").read_text())  # the README's
    body["metadata"]["name"] = NAME
    body["spec"]["engine"]["args"] = ["--batch-invariant"]  # answers equal whatever shares their batch
    objects = client.CustomObjectsApi(core.api_client)
    objects.create_namespaced_custom_object(G, V, NS, P, body)
    wait_for("2 ready replicas in the status", lambda: (objects.get_namespaced_custom_object(G, V, NS, P, NAME)
                                                        .get("status") or {}).get("readyReplicas") == 2, timeout=420)
    engines = pods(core, ENGINES)
    assert sorted(p.metadata.name for p in engines) == [f"{NAME}-r0-0", f"{NAME}-r1-0"]
    assert all(ready(p) for p in engines) and len({p.status.pod_ip for p in engines}) == 2
    for pod in [*engines, *pods(core, f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=router")]:
        assert restricted_violations(client.ApiClient().sanitize_for_serialization(pod.spec)) == []
    TIMINGS["ready_after_install_s"] = time.monotonic() - started


def test_router_answers_as_one_engine_does_and_spreads_requests(core) -> None:
    url = wait_for("the router's endpoint", lambda: router_url(core))
    wait_for("the router ready", lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200)
    routed = chat(url, PROMPTS[0])
    TIMINGS["first_answer_after_install_s"] = time.monotonic() - TIMINGS["helm_install"]
    direct_url = f"http://{engine_pod(core, f'{NAME}-r0-0').status.pod_ip}:8000"
    assert routed == chat(direct_url, PROMPTS[0]) and routed

    client_ = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    streamed = "".join(chunk.choices[0].text for chunk in client_.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0, stream=True))
    direct = openai.OpenAI(base_url=f"{direct_url}/v1", api_key="none", max_retries=0).completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
    assert streamed == direct.choices[0].text and streamed

    for prompt in PROMPTS * 2:
        chat(url, prompt)
    counts = router_counts(url)
    assert counts.get(f"{NAME}-r0-0", 0) >= 3 and counts.get(f"{NAME}-r1-0", 0) >= 3, counts


def test_a_killed_engine_is_restarted_and_the_router_waits_for_its_probe(core) -> None:
    url = router_url(core)
    victim = f"{NAME}-r0-0"
    survivor_url = f"http://{engine_pod(core, f'{NAME}-r1-0').status.pod_ip}:8000"
    expected = {prompt: chat(survivor_url, prompt) for prompt in PROMPTS}
    before = engine_pod(core, victim)
    pid = int(before.status.container_statuses[0].container_id.removeprefix("orca-dev://"))
    restarts = before.status.container_statuses[0].restart_count

    answers: list[tuple[str, str]] = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(lambda p: (p, chat(url, p)), PROMPTS[i % len(PROMPTS)]) for i in range(50)]
        wait_for("some of the load answered", lambda: sum(f.done() for f in futures) >= 4, timeout=60)
        os.kill(pid, signal.SIGKILL)  # from outside: neither the agent nor Kubernetes knows
        killed_at = time.monotonic()
        sent_to_victim = router_counts(url).get(victim, 0)

        def restarted_and_ready() -> bool:
            pod = engine_pod(core, victim)
            if not ready(pod):  # until its probe passes again, the router sends it nothing
                assert router_counts(url).get(victim, 0) == sent_to_victim
            return pod.status.container_statuses[0].restart_count == restarts + 1 and ready(pod)

        wait_for("the engine restarted and Ready", restarted_and_ready, timeout=240, interval=0.2)
        TIMINGS["kill_to_ready_s"] = time.monotonic() - killed_at
        answers = [f.result(timeout=240) for f in futures]
    assert len(answers) == 50 and all(text == expected[prompt] for prompt, text in answers)
    assert not alive(pid)
    # once Ready it takes traffic again
    wait_for("requests reach the restarted engine", lambda: chat(url, PROMPTS[1]) is not None
             and router_counts(url).get(victim, 0) > sent_to_victim, timeout=60)


def _running_requests(pod_ip: str) -> float:
    for line in httpx.get(f"http://{pod_ip}:8000/metrics", timeout=5).text.splitlines():
        if line.startswith("orca:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_deleting_an_engine_pod_mid_stream_drains_it(cluster, core) -> None:
    url = router_url(core)
    stream_client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    chunks: list[str] = []
    finished: dict[str, Any] = {}
    first_chunk = threading.Event()

    def stream() -> None:
        for chunk in stream_client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=400,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True}):
            chunks.append(chunk.choices[0].text)
            first_chunk.set()
            if chunk.choices[0].finish_reason:
                finished["reason"], finished["at"] = chunk.choices[0].finish_reason, time.monotonic()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    serving = wait_for("the engine serving the stream", lambda: next(
        (p for p in pods(core, ENGINES) if _running_requests(p.status.pod_ip) > 0), None))
    victim, old_uid = serving.metadata.name, serving.metadata.uid
    sent_to_victim = router_counts(url).get(victim, 0)
    deleted_at = time.monotonic()
    core.delete_namespaced_pod(victim, NS)  # what `kubectl delete pod` sends: the pod's own grace period

    # while it drains, new requests go to the other replica and all succeed
    wait_for("the pod terminating", lambda: engine_pod(core, victim).metadata.deletion_timestamp is not None)
    for prompt in PROMPTS:
        assert chat(url, prompt)
    reader.join(timeout=240)
    assert finished.get("reason") == "length" and len(chunks) >= 400, (finished, len(chunks))
    # the stream outlived the pre-stop hook, so SIGTERM reached the engine while it still streamed
    assert finished["at"] - deleted_at > 5

    def recreated_and_ready() -> bool:
        pod = engine_pod(core, victim)
        if pod.metadata.uid == old_uid or not ready(pod):
            assert router_counts(url).get(victim, 0) == sent_to_victim
            return False
        return True

    wait_for("the StatefulSet's new pod Ready", recreated_and_ready, timeout=240, interval=0.2)
    TIMINGS["delete_to_ready_s"] = time.monotonic() - deleted_at
    old_logs = list((cluster.state_dir / "node" / "pods").glob(f"{NS}_{victim}_{old_uid}/logs/engine/*.log"))
    assert any("draining" in path.read_text(errors="replace") for path in old_logs), old_logs


def test_cluster_down_leaves_no_process(cluster) -> None:
    state = cluster.state_dir
    recorded = [entry.pid for entry in [*cluster.table.running(), *dev_cluster.node_table(state).running()]]
    assert len(recorded) >= 5 + 1 + 3  # control plane and agent, operator, router and two engines
    stopped = dev_cluster.down(state)
    assert "node-agent" in stopped and "kube-apiserver" in stopped
    assert [pid for pid in recorded if alive(pid)] == []
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items() if k.endswith("_s")))
