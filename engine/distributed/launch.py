"""Start a replica's worker processes on this machine: every rank (one machine, `orca serve
--tensor-parallel-size N --pipeline-parallel-size M` or `LLM(...)`), or one stage's tensor ranks (a pod).

Each worker is `python -m orca.engine.distributed.worker` with the contract's environment for its
stage and its tensor rank. It dies with the process that started it (the worker asks Linux for a
parent-death signal as it starts; no `preexec_fn`, whose fork would run gRPC's fork handlers in a
process with gRPC threads), so a crashed master never leaves workers behind.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from ..config import EngineConfig
from .contract import WorkerEnvironment
from .worker import NUM_THREADS, PARENT_PID, TENSOR_RANK


def threads_per_worker(num_local_workers: int) -> int:
    """Divide this machine's cores between its workers, so CPU ranks do not oversubscribe them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // num_local_workers)


def start_worker(config: EngineConfig, environment: WorkerEnvironment, tensor_rank: int,
                 num_threads: int) -> subprocess.Popen:
    env = {**os.environ, **environment.to_environ(), TENSOR_RANK: str(tensor_rank), NUM_THREADS: str(num_threads),
           PARENT_PID: str(os.getpid()),
           "OMP_NUM_THREADS": str(num_threads), "PYTHONSAFEPATH": "1"}
    if environment.pod_ip.startswith("127."):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's traffic on loopback, where the ranks are
    config_json = json.dumps(dataclasses.asdict(config))
    return subprocess.Popen([sys.executable, "-m", "orca.engine.distributed.worker", "--config", config_json],
                            env=env)


def stop_workers(processes: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `timeout`."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
