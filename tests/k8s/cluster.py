"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager.

What envtest runs, built from Debian sources by build-envtest.sh (cached). No kubelet: pods are
created (StatefulSets, garbage collection and everything else controllers do work) but never run.
Tokens: `admin` (system:masters) and `operator`, which authenticates as the operator's
ServiceAccount so tests can check that its RBAC is enough and no more.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).parent
ADMIN_TOKEN = "orca-test-admin-token"
OPERATOR_TOKEN = "orca-test-operator-token"
OPERATOR_NAMESPACE = "orca-system"
OPERATOR_SA = "orca-operator"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assets() -> Path:
    """Build (once, cached) or locate the binaries; honours KUBEBUILDER_ASSETS."""
    out = subprocess.run(["bash", str(HERE / "build-envtest.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class Cluster:
    workdir: Path
    port: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def kubeconfig(self, token: str = ADMIN_TOKEN, name: str = "admin") -> Path:
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: test, cluster: {{server: "{self.server}", insecure-skip-tls-verify: true}}}}]
users: [{{name: {name}, user: {{token: {token}}}}}]
contexts: [{{name: test, context: {{cluster: test, user: {name}, namespace: default}}}}]
current-context: test
""")
        return path

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start() -> Cluster:
    bin_dir = assets()
    work = Path(tempfile.mkdtemp(prefix="orca-k8s-"))
    cluster = Cluster(work, _free_port())
    etcd_port, peer_port = _free_port(), _free_port()
    subprocess.run(["openssl", "genrsa", "-out", str(work / "sa.key"), "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(work / "sa.key"), "-pubout", "-out", str(work / "sa.pub")],
                   check=True, capture_output=True)
    (work / "tokens.csv").write_text(
        f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n'
        f'{OPERATOR_TOKEN},system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA},operator-uid,'
        f'"system:serviceaccounts,system:serviceaccounts:{OPERATOR_NAMESPACE},system:authenticated"\n')
    logs = work / "logs"
    logs.mkdir()

    def spawn(name: str, *args: str) -> None:
        log = open(logs / f"{name}.log", "w")
        cluster.procs.append(subprocess.Popen([str(bin_dir / name), *args], stdout=log, stderr=subprocess.STDOUT))

    spawn("etcd", "--data-dir", str(work / "etcd"), "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
          "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
          "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--log-level", "warn")
    spawn("kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}", f"--secure-port={cluster.port}",
          "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--cert-dir={work / 'certs'}",
          f"--service-account-key-file={work / 'sa.pub'}",
          f"--service-account-signing-key-file={work / 'sa.key'}",
          "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
          f"--token-auth-file={work / 'tokens.csv'}", "--authorization-mode=RBAC",
          "--service-cluster-ip-range=10.0.0.0/24", "--disable-admission-plugins=ServiceAccount",
          "--allow-privileged=true")
    try:
        _wait_ready(cluster)
        spawn("kube-controller-manager", f"--kubeconfig={cluster.kubeconfig()}", "--leader-elect=false",
              "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle",
              f"--service-account-private-key-file={work / 'sa.key'}", "--secure-port=0",
              "--use-service-account-credentials=false")
    except Exception:
        cluster.stop()
        raise
    return cluster


def _wait_ready(cluster: Cluster, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    while time.monotonic() < deadline:
        for p in cluster.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {cluster.workdir / 'logs'}")
        try:
            if httpx.get(f"{cluster.server}/readyz", headers=headers, verify=False, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("kube-apiserver did not become ready")
