"""The test session's control plane: `orca.operator.dev.control_plane` without a scheduler or node,
so pods are created (StatefulSets, garbage collection and every other controller work) but never run.

Tokens: `admin` (system:masters) and `operator`, which authenticates as the operator's
ServiceAccount so tests can check that its RBAC is enough and no more.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from orca.operator.dev.control_plane import ControlPlane, binaries, new_control_plane

OPERATOR_TOKEN = "orca-test-operator-token"
OPERATOR_NAMESPACE = "orca-system"
OPERATOR_SA = "orca-operator"


class Cluster(ControlPlane):
    @property
    def workdir(self) -> Path:
        return self.state_dir

    def stop(self, grace_seconds: float = 20) -> None:
        super().stop(grace_seconds)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def start() -> Cluster:
    bin_dir = binaries()
    operator_user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}"
    plane = new_control_plane(Path(tempfile.mkdtemp(prefix="orca-k8s-")), {OPERATOR_TOKEN: (
        operator_user, ["system:serviceaccounts", f"system:serviceaccounts:{OPERATOR_NAMESPACE}", "system:authenticated"])})
    cluster = Cluster(plane.state_dir, plane.port, plane.admin_token, plane.extra_tokens)
    cluster.start(scheduler=False, bin_dir=bin_dir)
    return cluster
