"""`orca dev cluster up` / `down`: the control plane plus one node agent, all in one state directory.

`up` starts fresh each time (a stopped cluster's state is kept only for its logs); `down` stops the
node agent first, which stops its pods, then the control plane, then any pod process still recorded
(an agent that was killed cannot stop its pods), each verified by pid and start time.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from .control_plane import ControlPlane, binaries, free_port, new_control_plane
from .processes import ProcessTable, spawn, stop

NODE_NAME = "orca-dev"
AGENT = "node-agent"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "orca" / "dev-cluster"


def node_table(state_dir: Path) -> ProcessTable:
    return ProcessTable(state_dir / "node" / "processes")


def up(state_dir: Path, gpus: int = 0, timeout: float = 90) -> ControlPlane:
    state_dir = state_dir.resolve()
    if (state_dir / "control-plane.json").exists() and (ControlPlane.load(state_dir).table.running()
                                                         or node_table(state_dir).running()):
        raise ValueError(f"a cluster (or some of its processes) is still up in {state_dir}; "
                         f"`orca dev cluster down --state-dir {state_dir}` first")
    bin_dir = binaries(progress=True)  # prints its progress the first time, when it builds
    shutil.rmtree(state_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    plane = new_control_plane(state_dir)
    plane.start(scheduler=True, bin_dir=bin_dir)
    admin = plane.kubeconfig()
    try:
        agent = spawn(plane.table, AGENT, [sys.executable, "-m", "orca.engine.cli", "dev", "node", "--kubeconfig",
                                           str(admin), "--name", NODE_NAME, "--state-dir", str(state_dir / "node"),
                                           "--gpus", str(gpus), "--kubelet-port", str(free_port())],
                      state_dir / "logs" / f"{AGENT}.log", env={**os.environ, "PYTHONSAFEPATH": "1"})
        _wait_for_node(admin, agent, timeout, state_dir)
    except BaseException:
        down(state_dir)
        raise
    return plane


def _wait_for_node(kubeconfig: Path, agent, timeout: float, state_dir: Path) -> None:  # noqa: ANN001
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise RuntimeError(f"the node agent exited with {agent.returncode}; see {state_dir / 'logs' / (AGENT + '.log')}")
        try:
            node = core.read_node(NODE_NAME)
            if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or []):
                return
        except ApiException as e:
            if e.status != 404:
                raise
        time.sleep(0.3)
    raise TimeoutError(f"node {NODE_NAME} not Ready in {timeout:.0f}s; see {state_dir / 'logs'}")


def down(state_dir: Path) -> list[str]:
    """Stop everything `up` started in `state_dir`, and nothing else; return what was stopped."""
    state_dir = state_dir.resolve()
    stopped = []
    if not (state_dir / "control-plane.json").exists():
        return stopped
    plane = ControlPlane.load(state_dir)
    for entry in plane.table.running():
        if entry.name == AGENT:
            stop(entry, grace_seconds=40)  # it stops its own pods first
            stopped.append(entry.name)
        plane.table.forget(AGENT)
    stopped += plane.running()
    plane.stop()
    for entry in node_table(state_dir).running():
        stop(entry, grace_seconds=5)
        stopped.append(entry.name)
    for entry in node_table(state_dir).records():
        node_table(state_dir).forget(entry.name)
    return stopped


def usage(plane: ControlPlane) -> str:
    kubeconfig = plane.state_dir / "admin.kubeconfig"
    return (f"cluster up: API server {plane.server}, node {NODE_NAME}\n"
            f"  export KUBECONFIG={kubeconfig}\n"
            f"  kubectl get nodes,pods -A -o wide\n"
            f"state, logs and pod logs: {plane.state_dir}\n"
            f"stop it with: orca dev cluster down --state-dir {plane.state_dir}")
