"""The environment a worker is started from: the one contract between the operator and the engine.

Torch-free and dependency-free, because both sides import it: `operator/render.py` writes these
variables into every engine pod, and a worker reads them back with `WorkerEnvironment.from_environ`.
A pod needs nothing else to take its place in a replica: its ordinal in the StatefulSet is its
pipeline stage, and every process of the replica finds the others through the master's store.

Ranks: a replica has `pipeline` stages of `tensor` ranks each; stage s, tensor rank t is global rank
`s * tensor + t`. Stage 0 also runs the master (scheduler and HTTP server); the pod of stage 0 is the
only one the engine Service sends requests to.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

TENSOR_PARALLEL_SIZE = "ORCA_TP"
PIPELINE_PARALLEL_SIZE = "ORCA_PP"
POD_NAME = "ORCA_POD_NAME"  # <statefulset>-<ordinal>; the ordinal is the stage
STAGE = "ORCA_STAGE"  # explicit stage, where no pod name carries it (local launches)
MASTER_ADDR = "ORCA_MASTER_ADDR"  # host of stage 0: the master's store, where every rank registers
MASTER_PORT = "ORCA_MASTER_PORT"
POD_IP = "ORCA_POD_IP"  # the address this pod's workers listen on and advertise
WORKER_PORT = "ORCA_WORKER_PORT"  # gRPC port of tensor rank 0 in this pod; rank t listens on port + t
HOSTS = "ORCA_HOSTS"  # optional "name=address,..." resolved before DNS (one-machine clusters have no DNS)

DEFAULT_MASTER_PORT = 29500
DEFAULT_WORKER_PORT = 29600
# Label the operator puts on every engine pod: its stage. The engine Service selects stage 0.
STAGE_LABEL = "orca.dev/stage"


def stage_of_pod(pod_name: str) -> int:
    """A StatefulSet pod's ordinal: `smollm2-r0-1` is stage 1."""
    prefix, _, ordinal = pod_name.rpartition("-")
    if not prefix or not ordinal.isdigit():
        raise ValueError(f"{POD_NAME}={pod_name!r} does not end in a StatefulSet ordinal (name-N)")
    return int(ordinal)


def master_host(group: str, namespace: str) -> str:
    """Stable DNS name of stage 0 through the replica's headless Service."""
    return f"{group}-0.{group}.{namespace}.svc"


def pod_env(tensor: int, pipeline: int, group: str, namespace: str) -> list[dict]:
    """The `env` of an engine container: every variable `from_environ` reads, in Kubernetes' form."""
    def field(path: str) -> dict:
        return {"valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    return [
        {"name": TENSOR_PARALLEL_SIZE, "value": str(tensor)},
        {"name": PIPELINE_PARALLEL_SIZE, "value": str(pipeline)},
        {"name": POD_NAME, **field("metadata.name")},
        {"name": POD_IP, **field("status.podIP")},
        {"name": MASTER_ADDR, "value": master_host(group, namespace)},
        {"name": MASTER_PORT, "value": str(DEFAULT_MASTER_PORT)},
        {"name": WORKER_PORT, "value": str(DEFAULT_WORKER_PORT)},
    ]


@dataclass(frozen=True)
class WorkerEnvironment:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    stage: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    pod_ip: str = "127.0.0.1"
    worker_port: int = DEFAULT_WORKER_PORT
    hosts: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name, value in ((TENSOR_PARALLEL_SIZE, self.tensor_parallel_size),
                            (PIPELINE_PARALLEL_SIZE, self.pipeline_parallel_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not 0 <= self.stage < self.pipeline_parallel_size:
            raise ValueError(f"stage {self.stage} is outside the {self.pipeline_parallel_size} pipeline stages "
                             f"({PIPELINE_PARALLEL_SIZE})")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def is_master(self) -> bool:
        """Stage 0 runs the scheduler and serves HTTP."""
        return self.stage == 0

    def rank(self, tensor_rank: int) -> int:
        return self.stage * self.tensor_parallel_size + tensor_rank

    def resolve(self, host: str) -> str:
        """`host` through ORCA_HOSTS first, then the system resolver."""
        aliases = dict(self.hosts)
        if host in aliases:
            return aliases[host]
        return socket.gethostbyname(host)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> WorkerEnvironment:
        """Read the contract; a bad value raises ValueError naming its variable."""
        env = os.environ if environ is None else environ

        def number(name: str, default: int) -> int:
            text = env.get(name, "")
            if not text:
                return default
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} must be an integer") from None

        if env.get(STAGE):
            stage = number(STAGE, 0)
        elif env.get(POD_NAME):
            stage = stage_of_pod(env[POD_NAME])
        else:
            stage = 0
        hosts = []
        for item in filter(None, (part.strip() for part in env.get(HOSTS, "").split(","))):
            name, sep, address = item.partition("=")
            if not sep or not name or not address:
                raise ValueError(f"{HOSTS}: {item!r} must be name=address")
            hosts.append((name, address))
        return cls(tensor_parallel_size=number(TENSOR_PARALLEL_SIZE, 1),
                   pipeline_parallel_size=number(PIPELINE_PARALLEL_SIZE, 1), stage=stage,
                   master_addr=env.get(MASTER_ADDR) or "127.0.0.1", master_port=number(MASTER_PORT, DEFAULT_MASTER_PORT),
                   pod_ip=env.get(POD_IP) or "127.0.0.1", worker_port=number(WORKER_PORT, DEFAULT_WORKER_PORT),
                   hosts=tuple(hosts))

    def to_environ(self) -> dict[str, str]:
        """The same contract as variables, for workers started as local processes (stage explicit)."""
        env = {TENSOR_PARALLEL_SIZE: str(self.tensor_parallel_size),
               PIPELINE_PARALLEL_SIZE: str(self.pipeline_parallel_size), STAGE: str(self.stage),
               MASTER_ADDR: self.master_addr, MASTER_PORT: str(self.master_port), POD_IP: self.pod_ip,
               WORKER_PORT: str(self.worker_port)}
        if self.hosts:
            env[HOSTS] = ",".join(f"{name}={address}" for name, address in self.hosts)
        return env
