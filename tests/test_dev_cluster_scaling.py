"""Routing and autoscaling on the one-machine cluster, end to end: prefix affinity measured by the
engines' own prefix-cache counters, and the autoscaler scaling up under Poisson load and back down
without losing a request, also when the replica being drained is killed.

The timeline (load change to decision, to the new replica Ready, to scale-down) is printed for the
closing note (`pytest -s`).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client

from dev_cluster_client import (G, NS, P, V, chat, engines, install_chart, metric_by_label, pods, ready, router_counts,
                                router_replicas_ready, router_url, wait_for)
from orca.engine.bundled_model import bundled_model_path
from orca.engine.loaders.gguf_tokenizer import load_gguf_tokenizer

pytest.importorskip("helm_sdkpy", reason="installed by `make` (pip --ignore-requires-python helm-sdkpy)")
pytestmark = [pytest.mark.slow, pytest.mark.k8s,
              pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")]
ROOT = Path(__file__).parent.parent
PROMPTS = ["Say hi", "Name a colour", "Count to three", "What is 2+2?", "Name a fruit"]
SYSTEM = " ".join(f"Rule {i}: answer politely, briefly and truthfully, and never mention rule {i + 1}."
                  for i in range(20))
TIMELINE: dict[str, float] = {}
# A request queued on the first replica while new ones start beside it on the same two CPUs can wait
# minutes; it is lost only if it never comes back.
LOAD_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def objects(dev_cluster, dev_core) -> client.CustomObjectsApi:
    install_chart(dev_cluster)
    wait_for("the operator pod Ready", lambda: any(ready(p) for p in pods(
        dev_core, "app.kubernetes.io/name=orca-operator", "orca-system")), timeout=420)  # a cold node builds kernels
    return client.CustomObjectsApi(dev_core.api_client)


def deploy(objects: client.CustomObjectsApi, name: str, **spec: Any) -> None:
    body = yaml.safe_load((ROOT / "charts/orca/examples/one-machine.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"]["engine"]["args"] = ["--batch-invariant"]  # answers equal whatever shares their batch
    body["spec"].update(spec)
    objects.create_namespaced_custom_object(G, V, NS, P, body)


def status(objects: client.CustomObjectsApi, name: str) -> dict:
    return objects.get_namespaced_custom_object(G, V, NS, P, name).get("status") or {}


def replicas(objects: client.CustomObjectsApi, name: str) -> int:
    return int(objects.get_namespaced_custom_object(G, V, NS, P, name)["spec"]["replicas"])


def delete(objects: client.CustomObjectsApi, core: client.CoreV1Api, name: str) -> None:
    objects.delete_namespaced_custom_object(G, V, NS, P, name)
    wait_for(f"{name}'s pods gone", lambda: not pods(core, f"app.kubernetes.io/instance={name}"), timeout=120)


def prefix_hits(core: client.CoreV1Api, name: str) -> dict[str, float]:
    return {p.metadata.name: sum(metric_by_label(f"http://{p.status.pod_ip}:8000", "orca:prefix_cache_hits_total",
                                                 "model_name").values())
            for p in pods(core, engines(name)) if ready(p)}


def test_prefix_affinity_keeps_a_shared_system_prompt_on_one_replica(objects, dev_core) -> None:
    deploy(objects, "prefix")
    try:
        wait_for("2 ready replicas", lambda: status(objects, "prefix").get("readyReplicas") == 2, timeout=420)
        url = wait_for("the router", lambda: router_url(dev_core, "prefix"))
        wait_for("the router ready", lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200)
        tokenizer = load_gguf_tokenizer(bundled_model_path())
        system_tokens = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}],
                                                                           add_generation_prompt=False)))
        assert system_tokens >= 300
        shared_tokens = (system_tokens // 16) * 16  # whole blocks of the shared prefix (a little less: the template)
        wait_for("both replicas eligible in the router", lambda: router_replicas_ready(url) == 2)

        def send_forty(tag: str) -> tuple[dict[str, float], dict[str, float]]:
            hits_before, routed_before = prefix_hits(dev_core, "prefix"), router_counts(url)
            for i in range(40):
                assert chat(url, f"{tag} question {i}: name a number.", max_tokens=4, system=SYSTEM)
            hits, routed = prefix_hits(dev_core, "prefix"), router_counts(url)
            return ({k: hits[k] - hits_before.get(k, 0) for k in hits},
                    {k: routed.get(k, 0) - routed_before.get(k, 0) for k in routed})

        hits, routed = send_forty("affinity")
        threshold = 0.9 * 40 * (shared_tokens - 16)  # 90% of the shared blocks of 40 requests
        print(f"\nprefix affinity on: prefix-cache hit tokens by replica {hits}, requests {routed}, "
              f"threshold {threshold:.0f}")
        assert max(hits.values()) >= threshold and max(routed.values()) >= 38

        objects.patch_namespaced_custom_object(G, V, NS, P, "prefix", {"spec": {"router": {"scoring": {
            "prefixAffinity": False}}}})
        router_pods = "app.kubernetes.io/instance=prefix,app.kubernetes.io/component=router"
        wait_for("the router rolled out without affinity", lambda: [p for p in pods(dev_core, router_pods) if ready(p) and
                                                                    "--no-prefix-affinity" in p.spec.containers[0].args]
                 and len(pods(dev_core, router_pods)) == 1, timeout=180)
        url = wait_for("the new router's endpoint", lambda: router_url(dev_core, "prefix"))
        wait_for("the new router ready", lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200)
        hits, routed = send_forty("spread")
        print(f"prefix affinity off: prefix-cache hit tokens by replica {hits}, requests {routed}")
        assert max(hits.values()) < threshold and min(routed.get(p, 0) for p in hits) >= 10
    finally:  # its engines would take the CPUs the autoscaling test schedules on
        delete(objects, dev_core, "prefix")


class Load:
    """Poisson arrivals, bounded in count and time, loopback only; every answer checked."""

    def __init__(self, url: str, expected: dict[str, str]) -> None:
        self.url, self.expected = url, expected
        self.sent = self.ok = 0
        self.failures: list[str] = []
        self.futures: list[Future] = []
        self.pool = ThreadPoolExecutor(48)
        self.lock = threading.Lock()

    def one(self, prompt: str, max_tokens: int = 24) -> None:
        try:
            text = chat(self.url, prompt, max_tokens=max_tokens, timeout=LOAD_TIMEOUT_S)
            good = text == self.expected[(prompt, max_tokens)]
        except Exception as e:  # counted and printed: the acceptance is zero of these
            good, text = False, f"{type(e).__name__}: {e}"
        with self.lock:
            self.ok += good
            if not good:
                self.failures.append(f"{prompt!r}: {text!r}")

    def poisson(self, rate: float, count: int, stop: threading.Event, seed: int = 0) -> None:
        rng = random.Random(seed)
        for i in range(count):
            if stop.is_set():
                break
            time.sleep(rng.expovariate(rate))
            self.sent += 1
            self.futures.append(self.pool.submit(self.one, PROMPTS[i % len(PROMPTS)]))

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for future in self.futures:
            future.result(timeout=max(0.0, deadline - time.monotonic()))


class StatusLog:
    """What the autoscaler saw and did, once a second, in a daemon thread: a failure shows it with the
    operator's log, where a bare timeout would say nothing of why."""

    def __init__(self, objects: client.CustomObjectsApi, core: client.CoreV1Api, name: str) -> None:
        self.objects, self.core, self.name = objects, core, name
        self.started, self.stop = time.monotonic(), threading.Event()
        self.lines: list[str] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        last = ""
        while not self.stop.wait(1.0):
            try:
                body = self.objects.get_namespaced_custom_object(G, V, NS, P, self.name)
            except Exception as e:  # the log is a diagnosis, never a failure of its own
                line = f"{type(e).__name__}"
            else:
                st = body.get("status") or {}
                line = (f"replicas {body['spec']['replicas']} ready {st.get('readyReplicas')} "
                        f"scaleDown {st.get('scaleDown')} autoscaler {st.get('autoscaler')}")
            if line != last:
                self.lines.append(f"{time.monotonic() - self.started:7.1f}s {line}")
                last = line

    def report(self) -> str:
        operator = pods(self.core, "app.kubernetes.io/name=orca-operator", "orca-system")
        tail = ""
        if operator:
            log = self.core.read_namespaced_pod_log(operator[0].metadata.name, "orca-system", tail_lines=5000)
            noise = ("InsecureRequestWarning", "warnings.warn", "aiohttp.access", "HTTP Request", "succeeded.")
            tail = "\n".join(line for line in log.splitlines() if not any(n in line for n in noise))[-6000:]
        return "autoscaler status over time:\n" + "\n".join(self.lines[-200:]) + "\noperator log:\n" + tail


def measured_capacity(url: str, expected: dict[tuple[str, int], str], batch: int = 2, rounds: int = 3) -> float:
    """Requests a second one replica answers with its batch full and nothing queued (a queue now
    would scale it up before the load starts): rounds of `batch` at once, the mix of the load."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch * rounds)]
    with ThreadPoolExecutor(batch) as pool:
        started = time.monotonic()
        answers = list(pool.map(lambda prompt: chat(url, prompt, max_tokens=24), prompts))
        elapsed = time.monotonic() - started
    assert answers == [expected[(prompt, 24)] for prompt in prompts]
    return len(prompts) / elapsed


def test_autoscaling_up_under_load_and_down_without_losing_a_request(objects, dev_core) -> None:
    deploy(objects, "auto", replicas=1,
           autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3, "metric": "requestsWaiting", "target": 2,
                        "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 30,
                        "drainTimeoutSeconds": 90},
           engine={"maxBatchSize": 2, "kvCacheMemory": "256MiB", "args": ["--batch-invariant"]})
    wait_for("1 ready replica", lambda: status(objects, "auto").get("readyReplicas") == 1, timeout=420)
    history = StatusLog(objects, dev_core, "auto")
    try:
        scale_up_and_down(objects, dev_core)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{history.report()}") from e
    finally:
        history.stop.set()


def scale_up_and_down(objects: client.CustomObjectsApi, dev_core: client.CoreV1Api) -> None:
    url = wait_for("the router", lambda: router_url(dev_core, "auto"))
    wait_for("the router ready", lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200)
    first = next(p for p in pods(dev_core, engines("auto")) if ready(p))
    direct = f"http://{first.status.pod_ip}:8000"
    expected = {(prompt, max_tokens): chat(direct, prompt, max_tokens=max_tokens)
                for prompt in PROMPTS for max_tokens in (24, 64)}
    load = Load(url, expected)
    # 2.5x what one replica answers with its batch full, at most 6/s: a queue builds for the autoscaler
    # on any machine and lasts while the new replicas share its CPUs (at 1.5x two replicas cleared it, and
    # the scale-down this test watches for came during the load), and they clear it once the load stops.
    rate = min(6.0, 2.5 * measured_capacity(direct, expected))
    assert replicas(objects, "auto") == 1  # the scale-up to come is the load's doing

    load_started, heavy_stop = time.monotonic(), threading.Event()
    sender = threading.Thread(target=load.poisson, args=(rate, 400, heavy_stop), daemon=True)
    sender.start()
    try:
        wait_for("a scale-up decision", lambda: replicas(objects, "auto") >= 2, timeout=120, interval=0.2)
        TIMELINE["load_to_decision_s"] = time.monotonic() - load_started
        wait_for("2 replicas Ready", lambda: status(objects, "auto").get("readyReplicas", 0) >= 2, timeout=240,
                 interval=0.2)
        TIMELINE["load_to_second_replica_ready_s"] = time.monotonic() - load_started
        time.sleep(max(0.0, 45.0 - (time.monotonic() - load_started)) + 10.0)  # the load goes on beside the new replicas
    finally:
        heavy_stop.set()
    sender.join(timeout=120)
    load.wait(timeout=LOAD_TIMEOUT_S + 60)
    load_stopped = time.monotonic()
    spread = router_counts(url)
    assert len([n for n in spread.values() if n > 0]) >= 2, spread
    peak = replicas(objects, "auto")

    # a light load while it scales down; the first replica drained is killed mid-drain
    light_stop = threading.Event()

    def light() -> None:
        while not light_stop.is_set():
            with load.lock:
                load.sent += 1
                prompt = PROMPTS[load.sent % len(PROMPTS)]
            load.one(prompt, max_tokens=64)

    lights = [threading.Thread(target=light, daemon=True) for _ in range(2)]
    for thread in lights:
        thread.start()
    try:
        drain = wait_for("a scale-down drain", lambda: status(objects, "auto").get("scaleDown"), timeout=180,
                         interval=0.1)
        TIMELINE["load_stop_to_first_drain_s"] = time.monotonic() - load_stopped
        victim = next(p for p in pods(dev_core, f"{engines('auto')},orca.dev/replica={drain['replica']}"))
        assert victim.metadata.labels.get("orca.dev/serving") == "false"
        os.kill(int(victim.status.container_statuses[0].container_id.removeprefix("orca-dev://")), signal.SIGKILL)
        wait_for("the drain to end", lambda: not status(objects, "auto").get("scaleDown"), timeout=120, interval=0.2)
        assert "stopped answering while draining" in status(objects, "auto")["autoscaler"]["reason"]
        events = [e for e in dev_core.list_namespaced_event(NS).items if e.involved_object.name == "auto"]
        assert any(e.reason == "ScaledDownVictimUnavailable" for e in events), [e.reason for e in events]
        wait_for("back to 1 replica",
                 lambda: replicas(objects, "auto") == 1 and len(pods(dev_core, engines("auto"))) == 1,
                 timeout=300, interval=0.5)
        TIMELINE["load_stop_to_one_replica_s"] = time.monotonic() - load_stopped
    finally:  # the streams never outlive the test, whatever failed
        light_stop.set()
        for thread in lights:
            thread.join(timeout=LOAD_TIMEOUT_S + 60)
    reasons = sorted({e.reason for e in events} | {e.reason for e in dev_core.list_namespaced_event(NS).items
                                                   if e.involved_object.name == "auto"})
    print(f"\nautoscaling: peak {peak} replicas; {load.sent} requests (Poisson {rate:.2f}/s, then 2 streams), "
          f"{load.ok} correct, "
          f"{len(load.failures)} failed; events {reasons}; timeline (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in TIMELINE.items()))
    assert load.failures == [] and load.ok == load.sent
    st = status(objects, "auto")
    assert st["desiredReplicas"] == 1 and st["lastScaleTime"] and st["autoscaler"]["metric"] == "requestsWaiting"
