"""Where the replicas are: a fixed list of --upstream URLs, or the Endpoints of a Kubernetes Service.

A source only says which addresses exist and whether Kubernetes calls them ready; the router's own
probes (`replicas`) decide whether they get traffic. Sources publish the whole current list each
time, so a missed update is repaired by the next one.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

log = logging.getLogger("orca.router")

WATCH_TIMEOUT_SECONDS = 30  # the API server ends each watch by then; the loop starts the next
MAX_BACKOFF_SECONDS = 30.0


@dataclass(frozen=True)
class Endpoint:
    address: str  # "ip:port" ("[ip]:port" for IPv6)
    pod_name: str | None
    ready: bool


Publish = Callable[[list[Endpoint]], None]


class EndpointSource(Protocol):
    async def run(self, publish: Publish) -> None:
        """Publish the current endpoints, then again on every change, until cancelled."""


def address_of_url(url: str) -> str:
    """`http://host:port` (or a bare `host:port`) as the "host:port" the router keys replicas by."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http":
        raise ValueError(f"--upstream {url}: only http:// upstreams are supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"--upstream {url}: give the server's root (scheme, host and port), no path")
    if not parts.hostname:
        raise ValueError(f"--upstream {url}: no host")
    try:
        port = parts.port or 80
    except ValueError as error:
        raise ValueError(f"--upstream {url}: {error}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


class StaticSource:
    """--upstream: the list never changes; the probes alone decide which upstream is usable."""

    def __init__(self, urls: list[str]) -> None:
        self.endpoints = [Endpoint(address_of_url(url), None, True) for url in urls]

    async def run(self, publish: Publish) -> None:
        publish(list(self.endpoints))
        await asyncio.Event().wait()


def endpoints_of(endpoints: Any) -> list[Endpoint]:
    """A V1Endpoints object (None when the Service has none yet) as ready and not-ready addresses."""
    found: dict[str, Endpoint] = {}
    for subset in (getattr(endpoints, "subsets", None) or []):
        ports = subset.ports or []
        port = next((p.port for p in ports if p.name == "http"), ports[0].port if ports else None)
        if port is None:
            continue
        for ready, addresses in ((True, subset.addresses), (False, subset.not_ready_addresses)):
            for entry in addresses or []:
                host = f"[{entry.ip}]" if ":" in entry.ip else entry.ip
                target = entry.target_ref
                pod_name = target.name if target is not None and target.kind in (None, "Pod") else None
                found.setdefault(f"{host}:{port}", Endpoint(f"{host}:{port}", pod_name, ready))
    return sorted(found.values(), key=lambda endpoint: endpoint.address)


def load_kubernetes_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()  # honours $KUBECONFIG


class EndpointsSource:
    """--service: list the Service's Endpoints, then watch it; on any error re-list after a backoff.

    The kubernetes client blocks, so the list-and-watch loop runs in a daemon thread of its own and
    hands each new list to the event loop; a watch ends after `WATCH_TIMEOUT_SECONDS` at the latest,
    which bounds how long a silently dead connection can hide changes.
    """

    def __init__(self, service: str, namespace: str, api: Any = None, watch_factory: Callable[[], Any] | None = None,
                 watch_timeout_seconds: int = WATCH_TIMEOUT_SECONDS) -> None:
        self.service, self.namespace = service, namespace
        self.api, self.watch_factory, self.watch_timeout_seconds = api, watch_factory, watch_timeout_seconds

    async def run(self, publish: Publish) -> None:
        loop, stop = asyncio.get_running_loop(), threading.Event()

        def publish_on_loop(endpoints: list[Endpoint]) -> None:
            loop.call_soon_threadsafe(publish, endpoints)

        thread = threading.Thread(target=self.list_and_watch, args=(publish_on_loop, stop),
                                  name=f"endpoints-{self.service}", daemon=True)
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            stop.set()

    def connect(self) -> None:
        if self.api is None:
            from kubernetes import client

            load_kubernetes_config()
            self.api = client.CoreV1Api()
        if self.watch_factory is None:
            from kubernetes import watch

            self.watch_factory = watch.Watch

    def list_and_watch(self, publish: Publish, stop: threading.Event) -> None:
        selector, backoff = f"metadata.name={self.service}", 0.5
        while not stop.is_set():
            try:
                self.connect()  # here, so a missing kubeconfig is retried and logged like any other error
                listed = self.api.list_namespaced_endpoints(self.namespace, field_selector=selector,
                                                            _request_timeout=10)
                publish(endpoints_of(listed.items[0] if listed.items else None))
                version, backoff = listed.metadata.resource_version, 0.5
                while not stop.is_set():
                    watcher = self.watch_factory()
                    for event in watcher.stream(self.api.list_namespaced_endpoints, self.namespace,
                                                field_selector=selector, resource_version=version,
                                                timeout_seconds=self.watch_timeout_seconds,
                                                _request_timeout=self.watch_timeout_seconds + 10):
                        if stop.is_set():
                            watcher.stop()
                            break
                        changed = event["object"]
                        version = changed.metadata.resource_version or version
                        publish([] if event["type"] == "DELETED" else endpoints_of(changed))
            except Exception as error:  # 410 Gone, the API server restarting, a network blip: start over
                log.warning("endpoints of %s/%s: %s; re-listing in %.1fs", self.namespace, self.service, error,
                            backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
