"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
(for a cluster whose pods run) kube-scheduler, all 1.20 built from Debian's sources by
`build_control_plane.sh` (once; cached). The Kubernetes tests start it without a scheduler or node;
`orca dev cluster up` starts it with both.

Everything lives in one state directory: certificates, etcd's data, tokens, logs, kubeconfigs and
the records of the processes started (`processes.py`), so a later `stop` from another process
stops exactly these.
"""
from __future__ import annotations

import json
import secrets
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .processes import ProcessTable, alive, spawn, stop

HERE = Path(__file__).parent
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# Stopped last to first: the scheduler and controllers before the API server, etcd last.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def binaries(progress: bool = False) -> Path:
    """Build (the first time, several minutes) or locate the binaries; honours KUBEBUILDER_ASSETS."""
    process = subprocess.run(["bash", str(HERE / "build_control_plane.sh")], stdout=subprocess.PIPE,
                             stderr=None if progress else subprocess.PIPE, text=True)
    if process.returncode:
        raise RuntimeError(f"building the control plane failed:\n{process.stderr or ''}")
    return Path(process.stdout.strip().splitlines()[-1])


@dataclass
class ControlPlane:
    state_dir: Path
    port: int
    admin_token: str
    extra_tokens: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # token: (user, groups)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def table(self) -> ProcessTable:
        return ProcessTable(self.state_dir / "processes")

    def kubeconfig(self, token: str | None = None, name: str = "admin", namespace: str = "default") -> Path:
        path = self.state_dir / f"{name}.kubeconfig"
        path.write_text(kubeconfig_text(self.server, token or self.admin_token, name, namespace))
        return path

    def save(self) -> None:
        (self.state_dir / "control-plane.json").write_text(json.dumps(
            {"port": self.port, "admin_token": self.admin_token}))

    @classmethod
    def load(cls, state_dir: Path) -> ControlPlane:
        saved = json.loads((state_dir / "control-plane.json").read_text())
        return cls(state_dir, saved["port"], saved["admin_token"])

    def start(self, scheduler: bool, bin_dir: Path) -> None:
        """Start every component detached and wait for the API server; on failure stop what started."""
        work, logs, table = self.state_dir, self.state_dir / "logs", self.table
        work.mkdir(parents=True, exist_ok=True)
        self.save()
        if not (work / "sa.key").exists():
            subprocess.run(["openssl", "genrsa", "-out", str(work / "sa.key"), "2048"], check=True, capture_output=True)
            subprocess.run(["openssl", "rsa", "-in", str(work / "sa.key"), "-pubout", "-out", str(work / "sa.pub")],
                           check=True, capture_output=True)
        (work / "tokens.csv").write_text(f'{self.admin_token},admin,admin-uid,"system:masters"\n' + "".join(
            f'{token},{user},{user}-uid,"{",".join(groups)}"\n' for token, (user, groups) in self.extra_tokens.items()))
        etcd_port, peer_port = free_port(), free_port()
        started = []

        def run(name: str, *args: str) -> None:
            started.append(spawn(table, name, [str(bin_dir / name), *args], logs / f"{name}.log"))

        try:
            run("etcd", "--data-dir", str(work / "etcd"), "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--log-level", "warn")
            run("kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}", f"--secure-port={self.port}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--cert-dir={work / 'certs'}",
                f"--service-account-key-file={work / 'sa.pub'}",
                f"--service-account-signing-key-file={work / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--token-auth-file={work / 'tokens.csv'}", "--authorization-mode=RBAC",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # Pods get their API credentials from the node agent (a TokenRequest), not a mounted volume.
                "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true",
                # `kubectl logs` reaches the node agent at its InternalIP (127.0.0.1).
                "--kubelet-preferred-address-types=InternalIP")
            self.wait_ready(started)
            admin = self.kubeconfig()
            run("kube-controller-manager", f"--kubeconfig={admin}", "--leader-elect=false",
                "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle",
                f"--service-account-private-key-file={work / 'sa.key'}", "--secure-port=0", "--port=0",
                "--use-service-account-credentials=false")
            if scheduler:
                run("kube-scheduler", f"--kubeconfig={admin}", "--leader-elect=false", "--secure-port=0", "--port=0")
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, processes: list[subprocess.Popen], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the API server's self-signed cert
        request = urllib.request.Request(f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"})
        while time.monotonic() < deadline:
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{Path(process.args[0]).name} exited with {process.returncode}; "
                                       f"logs in {self.state_dir / 'logs'}")
            try:
                with urllib.request.urlopen(request, context=context, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"kube-apiserver did not become ready in {timeout:.0f}s; logs in {self.state_dir / 'logs'}")

    def stop(self, grace_seconds: float = 20) -> None:
        """Stop the recorded components, last started first."""
        records = {entry.name: entry for entry in self.table.records()}
        for name in reversed(COMPONENTS):
            if name in records:
                stop(records[name], grace_seconds)
                self.table.forget(name)

    def running(self) -> list[str]:
        return [entry.name for entry in self.table.running() if entry.name in COMPONENTS and alive(entry.pid)]


def kubeconfig_text(server: str, token: str, user: str, namespace: str) -> str:
    return f"""apiVersion: v1
kind: Config
clusters: [{{name: orca-dev, cluster: {{server: "{server}", insecure-skip-tls-verify: true}}}}]
users: [{{name: {user}, user: {{token: {token}}}}}]
contexts: [{{name: orca-dev, context: {{cluster: orca-dev, user: {user}, namespace: {namespace}}}}}]
current-context: orca-dev
"""


def new_control_plane(state_dir: Path, extra_tokens: dict[str, tuple[str, list[str]]] | None = None) -> ControlPlane:
    return ControlPlane(state_dir, free_port(), secrets.token_hex(16), extra_tokens or {})
