"""Unit tests of what the development node runs for a pod: pure functions of the pod spec."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orca.operator.dev import container_spec as spec
from orca.operator.dev.node_agent import compile_bind_library, pod_address
from orca.operator.dev.probes import ProbeState
from orca.operator.dev.processes import ProcessTable, alive, spawn, start_time, stop

POD = {"metadata": {"name": "web-0", "namespace": "ns", "uid": "u1", "labels": {"app": "web"}},
       "spec": {"serviceAccountName": "sa", "volumes": [{"name": "scratch", "emptyDir": {}},
                                                         {"name": "models", "hostPath": {"path": "/srv/models"}}]},
       "status": {"podIP": "127.0.1.7"}}


def test_images_map_to_local_commands_and_command_replaces_the_entry_point() -> None:
    image_map = {spec.ORCA_IMAGE: ("orca",)}
    env = {"PORT": "8000"}
    assert spec.argv({"image": "ghcr.io/orca-serve/orca:0.1.0", "args": ["serve", "--port", "$(PORT)"]}, env,
                     image_map) == ["orca", "serve", "--port", "8000"]
    assert spec.argv({"image": "ghcr.io/orca-serve/orca@sha256:ab", "command": ["sleep", "$(NOPE)", "$$(PORT)"]},
                     env, image_map) == ["sleep", "$(NOPE)", "$(PORT)"]
    assert spec.image_repository("localhost:5000/orca:1") == "localhost:5000/orca"
    with pytest.raises(spec.PodSpecError, match="busybox.*--image busybox=COMMAND"):
        spec.argv({"image": "busybox:1"}, env, image_map)


def test_environment_resolves_field_refs_keys_and_expansion_in_order() -> None:
    container = {"env": [{"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                         {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                         {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                         {"name": "URL", "value": "http://$(IP):8000/$(NAME)"},
                         {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                         {"name": "MISSING", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "x", "optional": True}}}],
                 "envFrom": [{"configMapRef": {"name": "c"}, "prefix": "C_"}]}

    def read_key(kind: str, name: str, key: str, optional: bool):  # noqa: ANN202
        if kind == "configMapRef":
            return {"A": "1"}
        return {"s": {"k": "secret"}}.get(name, {}).get(key)

    env = spec.environment(POD, container, "orca-dev", "127.0.0.1", read_key)
    assert env == {"C_A": "1", "NAME": "web-0", "IP": "127.0.1.7", "APP": "web", "URL": "http://127.0.1.7:8000/web-0",
                   "KEY": "secret"}
    with pytest.raises(spec.PodSpecError, match="fieldPath 'spec.hostname'"):
        spec.environment(POD, {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}]},
                         "n", "h", read_key)


def test_volumes_are_directories_and_env_naming_a_mount_path_follows_it(tmp_path: Path) -> None:
    container = {"volumeMounts": [{"name": "scratch", "mountPath": "/tmp"},
                                  {"name": "models", "mountPath": "/models", "readOnly": True}]}
    mounts = spec.volumes(POD, container, tmp_path)
    assert [(m.name, m.host_path, m.read_only) for m in mounts] == [
        ("scratch", tmp_path / "volumes" / "scratch", False), ("models", Path("/srv/models"), True)]
    env = spec.rewrite_mount_paths({"HOME": "/tmp", "CACHE": "/tmp/cache", "OTHER": "/tmpx", "M": "/models/a.gguf"}, mounts)
    assert env == {"HOME": str(tmp_path / "volumes/scratch"), "CACHE": str(tmp_path / "volumes/scratch/cache"),
                   "OTHER": "/tmpx", "M": "/srv/models/a.gguf"}
    with pytest.raises(spec.PodSpecError, match="volumeMounts 'nope'"):
        spec.volumes(POD, {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, tmp_path)
    with pytest.raises(spec.PodSpecError, match="configMap volumes are not supported"):
        spec.volumes({"spec": {"volumes": [{"name": "c", "configMap": {"name": "x"}}]}},
                     {"volumeMounts": [{"name": "c", "mountPath": "/c"}]}, tmp_path)


def test_ports_and_users() -> None:
    container = {"name": "engine", "ports": [{"name": "http", "containerPort": 8000}]}
    assert spec.port_number(container, "http") == 8000 and spec.port_number(container, 9000) == 9000
    with pytest.raises(spec.PodSpecError, match="'grpc' names no port"):
        spec.port_number(container, "grpc")
    pod = {"spec": {"securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 2000}}}
    assert spec.user(pod, {}) == spec.User(65532, 65532, (2000,))
    assert spec.user(pod, {"securityContext": {"runAsUser": 1000}}).uid == 1000
    with pytest.raises(spec.PodSpecError, match="runAsNonRoot"):
        spec.user({"spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 0}}}, {})


def test_probe_thresholds() -> None:
    readiness = ProbeState({"periodSeconds": 2, "failureThreshold": 2, "successThreshold": 2,
                            "initialDelaySeconds": 5}, started=100.0)
    assert not readiness.due(104.0) and readiness.due(105.0)
    assert not readiness.record(True, 105.0) and not readiness.passing  # one success of two
    assert readiness.record(True, 107.0) and readiness.passing and readiness.next_due == 109.0
    assert not readiness.record(False, 109.0) and readiness.passing  # one failure of two
    assert readiness.record(False, 111.0) and not readiness.passing and readiness.failed


def test_pod_addresses_are_distinct_loopback_addresses_off_127_0_0() -> None:
    addresses = [pod_address(i) for i in range(600)]
    assert len(set(addresses)) == 600 and addresses[0] == "127.0.1.1" and addresses[254] == "127.0.2.1"
    assert all(a.startswith("127.0.") and not a.startswith("127.0.0.") for a in addresses)


def test_a_bind_to_any_address_binds_the_pod_address(tmp_path: Path) -> None:
    library = compile_bind_library(tmp_path)
    code = ("import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); s6 = socket.socket(socket.AF_INET6);"
            "s6.bind(('::', 0)); print(s.getsockname()[0], s6.getsockname()[0])")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": str(library),
                                                            "ORCA_DEV_POD_IP": "127.0.9.9"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["127.0.9.9", "::ffff:127.0.9.9"]


def test_process_table_stops_only_what_it_started(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "processes")
    ours = spawn(table, "sleeper", ["sleep", "60"], tmp_path / "sleeper.log")
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (entry,) = table.running()
        assert entry.pid == ours.pid and entry.is_ours()
        # a record whose pid now belongs to another process (another start time) is not ours
        forged = type(entry)("forged", stranger.pid, start_time(stranger.pid) + 1000)
        stop(forged, grace_seconds=1)
        assert alive(stranger.pid)
        stop(entry, grace_seconds=5)
        ours.wait(timeout=5)
        assert not alive(ours.pid) and table.running() == []
    finally:
        stranger.kill()
        stranger.wait()
        ours.kill()


def test_the_node_advertises_gpus_only_when_asked_and_says_they_are_simulated() -> None:
    from orca.operator.dev.node_agent import GPU_RESOURCE, SIMULATED_GPUS_LABEL, node_object

    plain, gpus = node_object("n", 0, 10250, "127.0.0.1"), node_object("n", 4, 10250, "127.0.0.1")
    assert GPU_RESOURCE not in plain["status"]["capacity"] and SIMULATED_GPUS_LABEL not in plain["metadata"]["labels"]
    assert gpus["status"]["allocatable"][GPU_RESOURCE] == "4" and gpus["metadata"]["labels"][SIMULATED_GPUS_LABEL] == "4"
    assert int(plain["status"]["capacity"]["cpu"]) == os.cpu_count()
    assert plain["status"]["addresses"][0] == {"type": "InternalIP", "address": "127.0.0.1"}
