"""`orca dev node`: a node that really runs its pods, as local processes (kwok's idea, with processes).

The agent registers a Node with this machine's CPUs and memory (and `nvidia.com/gpu` only when
asked, labelled as simulated), watches the pods the scheduler binds to it, and runs each one with a
`PodRuntime`: its own loopback address (127.0.x.y) as the pod IP, probes, restarts, the grace period
on deletion and the pod status, so Endpoints fill and StatefulSets roll as on a real node. It asks
the API server for each pod's ServiceAccount token, as the kubelet does, and hands it to the process
as a kubeconfig. On SIGTERM it stops every pod it started, and only those.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .container_spec import ORCA_ENTRY_POINT, ORCA_IMAGE, Obj, PodSpecError, image_repository
from .control_plane import kubeconfig_text
from .kubelet_server import self_signed_certificate, serve
from .pod_runtime import NodeContext, PodRuntime, now_rfc3339
from .processes import ProcessTable

log = logging.getLogger("orca.dev.node")
SYNC_SECONDS = 0.5
HEARTBEAT_SECONDS = 10.0
SHUTDOWN_GRACE_SECONDS = 10.0
GPU_RESOURCE = "nvidia.com/gpu"
SIMULATED_GPUS_LABEL = "orca.dev/simulated-gpus"


def pod_address(index: int) -> str:
    """The index-th pod address: 127.0.1.1, 127.0.1.2, ... (127.0.0.x is left to the host's own servers)."""
    if not 0 <= index < 254 * 254:
        raise ValueError(f"pod address index {index} out of range")
    return f"127.0.{1 + index // 254}.{1 + index % 254}"


def compile_bind_library(directory: Path) -> Path:
    source = Path(__file__).with_name("bind_pod_ip.c")
    library = directory / "bind_pod_ip.so"
    if not library.exists() or library.stat().st_mtime < source.stat().st_mtime:
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"], check=True,
                       capture_output=True)
    library.chmod(0o755)
    return library


def default_image_cache() -> Path:
    """What the project's image would have built in (its CPU kernels), kept across clusters as a pulled
    image is: one per checkout, since a build names its sources by path and another checkout's would
    rebuild it."""
    checkout = str(Path(__file__).resolve().parents[2])
    return Path.home() / ".cache" / "orca" / "dev-node" / f"image-{hashlib.sha1(checkout.encode()).hexdigest()[:12]}"


def node_object(name: str, gpus: int, kubelet_port: int, host_ip: str) -> Obj:
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{memory_kib}Ki", "pods": "110",
                "ephemeral-storage": "10Gi"}
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": _arch(),
              "orca.dev/node-agent": "true"}
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
        labels[SIMULATED_GPUS_LABEL] = str(gpus)  # advertised so GPU pods schedule; there are no GPUs here
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            "status": {"capacity": capacity, "allocatable": capacity, "conditions": _node_conditions(),
                       "addresses": [{"type": "InternalIP", "address": host_ip}, {"type": "Hostname", "address": name}],
                       "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
                       "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": platform.release(),
                                    "osImage": "orca dev node", "containerRuntimeVersion": "orca-dev://processes",
                                    "kubeletVersion": "v1.20.2", "kubeProxyVersion": "", "operatingSystem": "linux",
                                    "architecture": _arch()}}}


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _node_conditions() -> list[Obj]:
    now = now_rfc3339()
    healthy = [("MemoryPressure", "KubeletHasSufficientMemory"), ("DiskPressure", "KubeletHasNoDiskPressure"),
               ("PIDPressure", "KubeletHasSufficientPID")]
    return [{"type": kind, "status": "False", "reason": reason, "lastHeartbeatTime": now, "lastTransitionTime": now}
            for kind, reason in healthy] + [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                             "message": "orca dev node agent is posting ready status",
                                             "lastHeartbeatTime": now, "lastTransitionTime": now}]


class NodeAgent:
    def __init__(self, api: client.ApiClient, node_name: str, state_dir: Path, gpus: int = 0,
                 image_map: dict[str, tuple[str, ...]] | None = None, kubelet_port: int = 10250,
                 host_ip: str = "127.0.0.1", image_cache: Path | None = None) -> None:
        self.api, self.core = api, client.CoreV1Api(api)
        self.node_name, self.state_dir, self.gpus, self.kubelet_port, self.host_ip = \
            node_name, state_dir, gpus, kubelet_port, host_ip
        self.pods_dir = state_dir / "pods"
        self.image_cache = image_cache or default_image_cache()
        self.image_map = {ORCA_IMAGE: ORCA_ENTRY_POINT, **(image_map or {})}
        self.runtimes: dict[str, PodRuntime] = {}  # by pod uid
        self.next_address = 0
        self.stopping = threading.Event()
        self.pulled = threading.Event()

    # --- set-up ---------------------------------------------------------------------------------
    def _context(self) -> NodeContext:
        for directory in (self.state_dir, self.pods_dir):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)  # pods may run as other users and must reach their own directories
        image_cache = self.image_cache
        (image_cache / "torch_extensions").mkdir(parents=True, exist_ok=True)
        for path in (image_cache, image_cache / "torch_extensions"):
            path.chmod(0o1777)
        return NodeContext(self.node_name, self.host_ip, self.image_map, compile_bind_library(self.state_dir / "lib"),
                           image_cache, ProcessTable(self.state_dir / "processes"), self._read_key,
                           self._service_account_kubeconfig, self.image_pulled)

    def _pull_images(self) -> None:
        """This node's image pull: build what the project's image would contain (its CPU kernels) into the
        image cache once, before any pod needs it, so no pod compiles under its probes' deadlines."""
        extensions = self.image_cache / "torch_extensions"
        log_path = self.state_dir / "image-pull.log"
        with open(log_path, "ab") as out:  # builds take a lock of their own (kernels/cpu.py)
            code = subprocess.run([ORCA_ENTRY_POINT[0], "-c", "from orca.kernels import cpu; cpu.load()"],
                                  env={**os.environ, "PYTHONSAFEPATH": "1", "TORCH_EXTENSIONS_DIR": str(extensions)},
                                  stdout=out, stderr=subprocess.STDOUT).returncode
        log.info("image %s pulled (kernels built into %s, exit %d; log %s)", ORCA_IMAGE, extensions, code, log_path)
        self.pulled.set()

    def image_pulled(self, image: str) -> bool:
        return self.pulled.is_set() or image_repository(image) != ORCA_IMAGE

    def register(self) -> None:
        body = node_object(self.node_name, self.gpus, self.kubelet_port, self.host_ip)
        try:
            self.core.create_node({k: v for k, v in body.items() if k != "status"})
        except ApiException as e:
            if e.status != 409:
                raise
            self.core.patch_node(self.node_name, {"metadata": {"labels": body["metadata"]["labels"]}})
        self.core.patch_node_status(self.node_name, {"status": body["status"]})
        # The API server taints a new Node not-ready; the node lifecycle controller, which would lift it
        # once the node reports Ready, does not run here (it would also evict pods of a paused agent).
        taints = self.core.read_node(self.node_name).spec.taints or []
        kept = [t for t in taints if t.key != "node.kubernetes.io/not-ready"]
        if len(kept) != len(taints):
            self.core.patch_node(self.node_name, {"spec": {"taints": [
                {"key": t.key, "value": t.value, "effect": t.effect} for t in kept] or None}})

    def _heartbeat(self) -> None:
        self.core.patch_node_status(self.node_name, {"status": {"conditions": _node_conditions()}})

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        self.context = self._context()
        threading.Thread(target=self._pull_images, name="image-pull", daemon=True).start()
        certificate = self_signed_certificate(self.state_dir / "kubelet", self.node_name)
        server = serve(self.host_ip, self.kubelet_port, certificate, self._log_lookup)
        self.register()
        log.info("node %s registered (kubelet port %d); running pods as local processes", self.node_name,
                 self.kubelet_port)
        last_heartbeat = time.monotonic()
        try:
            while not self.stopping.is_set():
                try:
                    self.sync()
                    if time.monotonic() - last_heartbeat >= HEARTBEAT_SECONDS:
                        self._heartbeat()
                        last_heartbeat = time.monotonic()
                except Exception as e:  # the API server restarting, a timeout: try again next tick
                    log.warning("sync failed: %s", e)
                self.stopping.wait(SYNC_SECONDS)
        finally:
            self.shutdown()
            server.shutdown()

    def sync(self) -> None:
        answer = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node_name}",
                                                       _preload_content=False)
        pods = {pod["metadata"]["uid"]: pod for pod in json.loads(answer.data)["items"]}
        for uid, pod in pods.items():
            meta = pod["metadata"]
            runtime = self.runtimes.get(uid)
            if meta.get("deletionTimestamp"):
                grace = float(meta.get("deletionGracePeriodSeconds") or 0)
                if runtime is None:
                    self._remove(pod)
                else:
                    runtime.request_delete(grace)
            elif runtime is None and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                self._start_pod(pod)
        for uid, runtime in list(self.runtimes.items()):
            if uid not in pods:  # deleted without a grace period (--force): stop at once
                runtime.request_delete(0)
            if runtime.finished.is_set() and runtime.delete_grace is not None:
                if uid in pods:
                    self._remove(pods[uid])
                del self.runtimes[uid]

    def _start_pod(self, pod: Obj) -> None:
        meta = pod["metadata"]
        address = pod_address(self.next_address)
        self.next_address += 1
        pod_dir = self.pods_dir / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        runtime = PodRuntime(pod, address, pod_dir, self.context, self._report)
        self.runtimes[meta["uid"]] = runtime
        runtime.start()
        log.info("pod %s/%s: starting at %s", meta["namespace"], meta["name"], address)

    def _remove(self, pod: Obj) -> None:
        """What the kubelet does last: delete the pod object now that its processes have stopped."""
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0,
                                            body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                        preconditions={"uid": meta["uid"]}))
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def _report(self, runtime: PodRuntime, status: Obj) -> None:
        meta = runtime.pod["metadata"]
        # the uid makes a late report of a deleted pod fail, not land on its same-name successor
        body = {"metadata": {"uid": meta["uid"]},
                "status": {**status, "containerStatuses": [_replacing(c) for c in status["containerStatuses"]]}}
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], body)
        except ApiException as e:
            if e.status not in (404, 409, 422):
                log.warning("pod %s: status update failed: %s", runtime.key, e.reason)
        except Exception as e:  # the API server unreachable for a moment: the next change reports again
            log.warning("pod %s: status update failed: %s", runtime.key, e)
            runtime.republish()

    def shutdown(self) -> None:
        """Stop every pod this agent started (SIGTERM, then SIGKILL after a short grace)."""
        self.stopping.set()
        for runtime in self.runtimes.values():
            runtime.request_delete(min(SHUTDOWN_GRACE_SECONDS, float(runtime.pod["spec"].get(
                "terminationGracePeriodSeconds", 30))))
        for runtime in self.runtimes.values():
            runtime.finished.wait(SHUTDOWN_GRACE_SECONDS + 10)

    # --- what pods ask of the node --------------------------------------------------------------
    def _read_key(self, namespace: str, kind: str, name: str, key: str, optional: bool) -> Any:
        try:
            source = (self.core.read_namespaced_secret(name, namespace) if kind.startswith("secret")
                      else self.core.read_namespaced_config_map(name, namespace))
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            raise PodSpecError(f"{kind} {namespace}/{name}: {e.reason}") from None
        if kind.startswith("secret"):
            data = {k: base64.b64decode(v).decode() for k, v in (source.data or {}).items()}
        else:
            data = dict(source.data or {})
        if not key:
            return data
        if key not in data and not optional:
            raise PodSpecError(f"{kind} {namespace}/{name} has no key {key!r}")
        return data.get(key)

    def _service_account_kubeconfig(self, pod: Obj, pod_dir: Path) -> Path | None:
        """The pod's ServiceAccount token from a TokenRequest bound to the pod, as a kubeconfig file."""
        spec, meta = pod["spec"], pod["metadata"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        named = spec.get("serviceAccountName") or spec.get("serviceAccount")
        account = named or "default"
        request: Obj = {"spec": {"expirationSeconds": 86400}}
        if named:  # without ServiceAccount admission a pod may name none, and only a pod that names it binds
            request["spec"]["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                                 "uid": meta["uid"]}
        deadline = time.monotonic() + 15
        while True:
            try:
                token = self.core.create_namespaced_service_account_token(account, meta["namespace"], request).status.token
                break
            except ApiException as e:
                if e.status != 404 or time.monotonic() > deadline:
                    log.warning("pod %s/%s: no token for ServiceAccount %s: %s", meta["namespace"], meta["name"],
                                account, e.reason)
                    return None
                time.sleep(0.5)
        path = pod_dir / "serviceaccount.kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(kubeconfig_text(self.api.configuration.host, token, account, meta["namespace"]))
        path.chmod(0o644)
        return path

    def _log_lookup(self, namespace: str, pod: str, container: str, previous: bool):  # noqa: ANN202
        for runtime in list(self.runtimes.values()):
            meta = runtime.pod["metadata"]
            if (meta["namespace"], meta["name"]) == (namespace, pod):
                path = runtime.current_log(container, previous)
                if path is None or not path.exists():
                    return None
                run = next(r for r in runtime.containers if r.name == container)
                return path, (lambda: run.running and not previous)
        return None


def _replacing(container_status: Obj) -> Obj:
    """A state is one of waiting, running or terminated: name the other two as null so a patch replaces it."""
    out = dict(container_status)
    for field in ("state", "lastState"):
        value = container_status.get(field) or {}
        out[field] = {kind: value.get(kind) for kind in ("waiting", "running", "terminated")}
    return out


def run_agent(agent: NodeAgent) -> None:
    """Run until SIGTERM or SIGINT, then stop every pod."""
    def stop(signum: int, frame: object) -> None:
        agent.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()
