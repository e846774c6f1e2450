"""The whole system on one machine, end to end: `orca dev cluster up`, `helm install` of the chart, an
OrcaDeployment with two replicas, and requests from the official openai client through the router.

Nothing here is started by the test except the cluster itself: the operator pod comes from the
chart's Deployment, the engine and router pods from what the operator renders, and the node agent
runs them all as processes on their own loopback addresses. Timings (helm install to the first
answer, pod deletion to Ready again) are printed for the closing note (`pytest -s`).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from kubernetes import client

from dev_cluster_client import (G, MODEL, NS, P, V, chat, engine_gauge, engines, install_chart, pods, ready,
                                router_counts, router_replicas_ready, router_url, wait_for)
from orca.operator.dev import cluster as dev_cluster_commands
from orca.operator.dev.processes import alive
from pod_security import restricted_violations

pytest.importorskip("helm_sdkpy", reason="installed by `make` (pip --ignore-requires-python helm-sdkpy)")

# the dev API server's certificate is its own
pytestmark = [pytest.mark.slow, pytest.mark.k8s,
              pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")]
ROOT = Path(__file__).parent.parent
NAME = "smol"
ENGINES = engines(NAME)
TIMINGS: dict[str, float] = {}
PROMPTS = ["Say hi", "Name a colour", "Count to three", "What is 2+2?", "Name a fruit"]


def engine_pod(core: client.CoreV1Api, name: str) -> client.V1Pod:
    return core.read_namespaced_pod(name, NS)


def test_helm_install_runs_the_operator_and_two_engines_become_ready(dev_cluster, dev_core) -> None:
    started = time.monotonic()
    TIMINGS["helm_install"] = started
    install_chart(dev_cluster)
    # the chart's own Deployment runs the operator, through the scheduler and the node agent
    operator_pod = wait_for("the operator pod Ready", lambda: next(  # a cold node builds kernels first
        (p for p in pods(dev_core, "app.kubernetes.io/name=orca-operator", "orca-system") if ready(p)), None), timeout=420)
    assert operator_pod.spec.node_name == "orca-dev" and operator_pod.status.pod_ip.startswith("127.0.")
    spec = client.ApiClient().sanitize_for_serialization(operator_pod.spec)
    assert restricted_violations(spec) == []

    body = yaml.safe_load((ROOT / "charts/orca/examples/one-machine.yaml").read_text())  # the README's
    body["metadata"]["name"] = NAME
    body["spec"]["engine"]["args"] = ["--batch-invariant"]  # answers equal whatever shares their batch
    # least-load routing alone: every chat shares the template's system prompt, which affinity would
    # keep on one replica (prefix affinity has its own test in test_dev_cluster_scaling.py)
    body["spec"]["router"]["scoring"] = {"prefixAffinity": False}
    objects = client.CustomObjectsApi(dev_core.api_client)
    objects.create_namespaced_custom_object(G, V, NS, P, body)
    wait_for("2 ready replicas in the status", lambda: (objects.get_namespaced_custom_object(G, V, NS, P, NAME)
                                                        .get("status") or {}).get("readyReplicas") == 2, timeout=420)
    engines = pods(dev_core, ENGINES)
    assert sorted(p.metadata.name for p in engines) == [f"{NAME}-r0-0", f"{NAME}-r1-0"]
    assert all(ready(p) for p in engines) and len({p.status.pod_ip for p in engines}) == 2
    for pod in [*engines, *pods(dev_core, f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=router")]:
        assert restricted_violations(client.ApiClient().sanitize_for_serialization(pod.spec)) == []
    TIMINGS["ready_after_install_s"] = time.monotonic() - started


def test_router_answers_as_one_engine_does_and_spreads_requests(dev_core) -> None:
    url = wait_for("the router's endpoint", lambda: router_url(dev_core, NAME))
    wait_for("the router ready", lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200)
    routed = chat(url, PROMPTS[0])
    TIMINGS["first_answer_after_install_s"] = time.monotonic() - TIMINGS["helm_install"]
    direct_url = f"http://{engine_pod(dev_core, f'{NAME}-r0-0').status.pod_ip}:8000"
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


def test_a_killed_engine_is_restarted_and_the_router_waits_for_its_probe(dev_core) -> None:
    url = wait_for("the router's endpoint", lambda: router_url(dev_core, NAME))
    victim = f"{NAME}-r0-0"
    survivor_url = f"http://{engine_pod(dev_core, f'{NAME}-r1-0').status.pod_ip}:8000"
    expected = {prompt: chat(survivor_url, prompt) for prompt in PROMPTS}
    before = engine_pod(dev_core, victim)
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
            pod = engine_pod(dev_core, victim)
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


def test_deleting_an_engine_pod_mid_stream_drains_it(dev_cluster, dev_core) -> None:
    url = wait_for("the router's endpoint", lambda: router_url(dev_core, NAME))
    stream_client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
    chunks: list[str] = []
    finished: dict[str, Any] = {}
    first_chunk = threading.Event()

    # The stream must outlive the pre-stop hook and end within the engine's drain timeout (30 s): about
    # 12 s of this machine's decoding, measured first on a short stream.
    started, probe = time.monotonic(), list(stream_client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=48, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    tokens_per_s = len(probe) / (time.monotonic() - started)
    max_tokens = int(min(400, max(24, 12 * tokens_per_s)))

    def stream() -> None:
        for chunk in stream_client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=max_tokens,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True}):
            chunks.append(chunk.choices[0].text)
            first_chunk.set()
            if chunk.choices[0].finish_reason:
                finished["reason"], finished["at"] = chunk.choices[0].finish_reason, time.monotonic()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(60)
    serving = wait_for("the engine serving the stream", lambda: next(
        (p for p in pods(dev_core, ENGINES) if engine_gauge(p.status.pod_ip, "orca:num_requests_running") > 0), None))
    victim, old_uid = serving.metadata.name, serving.metadata.uid
    deleted_at = time.monotonic()
    dev_core.delete_namespaced_pod(victim, NS)  # what `kubectl delete pod` sends: the pod's own grace period

    # Once the router has seen the Endpoints drop the pod, new requests go to the other replica and all
    # succeed. Until then one may still reach the victim, which serves it: that window is what the
    # pre-stop hook's sleep is for.
    wait_for("the pod terminating", lambda: engine_pod(dev_core, victim).metadata.deletion_timestamp is not None)
    wait_for("the router dropping the terminating pod", lambda: router_replicas_ready(url) == 1)
    sent_to_victim = router_counts(url).get(victim, 0)
    for prompt in PROMPTS:
        assert chat(url, prompt)
    reader.join(timeout=240)
    assert finished.get("reason") == "length" and len(chunks) >= max_tokens, (finished, len(chunks), max_tokens)
    # the stream outlived the pre-stop hook, so SIGTERM reached the engine while it still streamed
    assert finished["at"] - deleted_at > 5

    def recreated_and_ready() -> bool:
        pod = engine_pod(dev_core, victim)
        if pod.metadata.uid == old_uid or not ready(pod):
            assert router_counts(url).get(victim, 0) == sent_to_victim
            return False
        return True

    wait_for("the StatefulSet's new pod Ready", recreated_and_ready, timeout=240, interval=0.2)
    TIMINGS["delete_to_ready_s"] = time.monotonic() - deleted_at
    old_logs = list((dev_cluster.state_dir / "node" / "pods").glob(f"{NS}_{victim}_{old_uid}/logs/engine/*.log"))
    assert any("draining" in path.read_text(errors="replace") for path in old_logs), old_logs


def test_cluster_down_leaves_no_process(dev_cluster) -> None:
    state = dev_cluster.state_dir
    recorded = [entry.pid for entry in [*dev_cluster.table.running(), *dev_cluster_commands.node_table(state).running()]]
    assert len(recorded) >= 5 + 1 + 3  # control plane and agent, operator, router and two engines
    stopped = dev_cluster_commands.down(state)
    assert "node-agent" in stopped and "kube-apiserver" in stopped
    assert [pid for pid in recorded if alive(pid)] == []
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items() if k.endswith("_s")))
