"""What the Kubernetes tests share (the control plane alone and the one-machine cluster): a bounded
wait, pod and router lookups, and chat calls."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
from kubernetes import client
from kubernetes.client.exceptions import ApiException

NS, MODEL = "default", "SmolLM2-135M-Instruct"
G, V, P = "orca.dev", "v1alpha1", "orcadeployments"


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


def pods(core: client.CoreV1Api, selector: str, namespace: str = NS) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=selector).items


def ready(pod: client.V1Pod) -> bool:
    return pod.metadata.deletion_timestamp is None and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def engines(name: str) -> str:
    return f"app.kubernetes.io/instance={name},app.kubernetes.io/component=engine"


def router_url(core: client.CoreV1Api, name: str) -> str:
    """The router Service's endpoint (there is no kube-proxy here: clients use the pod address), or ""
    while the Endpoints object exists but lists no ready router yet, so `wait_for` keeps waiting."""
    endpoints = core.read_namespaced_endpoints(name, NS)
    addresses = [address for subset in endpoints.subsets or [] for address in subset.addresses or []]
    return f"http://{addresses[0].ip}:8000" if addresses else ""


def metric_by_label(url: str, metric: str, label: str, only: str = "") -> dict[str, float]:
    """A counter's values summed by one label, from a /metrics page (lines containing `only`)."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(metric + "{") and only in line:
            key = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            values[key] = values.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return values


def router_counts(url: str) -> dict[str, float]:
    """Router requests answered 200, by replica (the pod name)."""
    return metric_by_label(url, "orca:router_requests_total", "replica", only='code="200"')


def router_replicas_ready(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("orca:router_replicas_ready"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def engine_gauge(pod_ip: str, metric: str) -> float:
    for line in httpx.get(f"http://{pod_ip}:8000/metrics", timeout=5).text.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def chat(base_url: str, prompt: str, max_tokens: int = 16, system: str | None = None, timeout: float = 120) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    answer = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=timeout).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    return answer.choices[0].message.content


def install_chart(cluster: Any) -> None:
    """`helm install orca charts/orca -n orca-system --create-namespace`, with Helm's own library."""
    import helm_sdkpy as helm

    config = helm.Configuration(namespace="orca-system", kubeconfig=str(cluster.state_dir / "admin.kubeconfig"))
    chart = Path(__file__).parent.parent / "charts/orca"
    asyncio.run(helm.Install(config).run("orca", str(chart), create_namespace=True, wait=False))
