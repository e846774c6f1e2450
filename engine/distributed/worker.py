"""One rank of a replica: its shard of its stage's layers, its slice of the KV cache, and a gRPC server.

The master (or the previous stage) calls `Execute` with each iteration's control message; the worker
queues it for its compute loop and passes it to the same tensor rank of the next stage at once, so
control runs ahead of compute along the pipeline. The compute loop applies the message to its copy of
the requests, takes the previous stage's activations over torch.distributed, runs the model runner
and sends its activations on; the last stage's tensor rank 0 streams the sampled tokens back to the
master through `Outputs`. A worker that hears no heartbeat from the master for a while exits, so a
replica whose master died never lingers.

Run as `python -m orca.engine.distributed.worker --config JSON` with the contract's environment plus
ORCA_TENSOR_RANK (set by the launcher in each pod).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch
import torch.distributed as dist

from ..config import EngineConfig
from ..device import resolve_device
from ..loaders import load_model
from ..model_runner import ModelRunner
from . import parallel_state
from . import worker_pb2 as pb
from . import worker_pb2_grpc as pb_grpc
from .contract import WorkerEnvironment
from .control import RequestMirror, output_to_proto

log = logging.getLogger("orca.worker")

TENSOR_RANK = "ORCA_TENSOR_RANK"  # set by the pod-local launcher, one process per GPU
NUM_THREADS = "ORCA_NUM_THREADS"  # CPU threads of this rank (the launcher divides the cores)
PARENT_PID = "ORCA_PARENT_PID"  # the launcher: this worker dies with it
HEARTBEAT_TIMEOUT = "ORCA_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT = 15.0  # seconds without a master heartbeat before a worker exits
STORE_TIMEOUT_SECONDS = 600.0  # the whole replica must have joined within this
WORKER_KEY = "orca/worker/{rank}"  # store key where a rank publishes its gRPC address


def store_client(environment: WorkerEnvironment, timeout_seconds: float = STORE_TIMEOUT_SECONDS) -> dist.TCPStore:
    import datetime

    return dist.TCPStore(environment.resolve(environment.master_addr), environment.master_port, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_seconds))


def channel_options() -> list[tuple[str, int]]:
    """Control messages of a large batch pass the 4 MiB default (256 requests of long prompts)."""
    return [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


class Worker(pb_grpc.WorkerServicer):
    def __init__(self, config: EngineConfig, environment: WorkerEnvironment, tensor_rank: int) -> None:
        self.environment, self.tensor_rank = environment, tensor_rank
        self.rank = environment.rank(tensor_rank)
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.forward_queue: queue.SimpleQueue[pb.StepRequest | None] = queue.SimpleQueue()
        self.outputs: queue.SimpleQueue[pb.StepOutput] = queue.SimpleQueue()
        self.spans: list[pb.StageSpan] = []
        self.mirror = RequestMirror()
        self.last_heartbeat = time.monotonic()
        self.heartbeat_timeout = float(os.environ.get(HEARTBEAT_TIMEOUT) or DEFAULT_HEARTBEAT_TIMEOUT)

        self.server = grpc.server(ThreadPoolExecutor(max_workers=8), options=channel_options())
        port = environment.worker_port + tensor_rank if environment.worker_port else 0
        self.port = self.server.add_insecure_port(f"{environment.pod_ip}:{port}")
        pb_grpc.add_WorkerServicer_to_server(self, self.server)
        self.server.start()

        device = resolve_device(config.device)
        if device.type == "cuda":  # a pod's GPUs are its tensor ranks'; one machine's, all the ranks'
            torch.cuda.set_device(self.rank % torch.cuda.device_count())
        if os.environ.get(NUM_THREADS):
            torch.set_num_threads(int(os.environ[NUM_THREADS]))
        self.store = store_client(environment)
        self.state = parallel_state.initialize(
            dist.PrefixStore("orca/pg", self.store), environment.tensor_parallel_size,
            environment.pipeline_parallel_size, environment.stage, tensor_rank,
            "nccl" if device.type == "cuda" else "gloo", STORE_TIMEOUT_SECONDS)
        loaded = load_model(config.model, config.load_format)
        self.runner = ModelRunner(config, loaded)
        self.hidden_size = loaded.config.hidden_size
        self.next_stage: pb_grpc.WorkerStub | None = None
        self.last_heartbeat = time.monotonic()
        self.store.set(WORKER_KEY.format(rank=self.rank), f"{environment.pod_ip}:{self.port}")
        log.info("rank %d (stage %d, tensor rank %d) ready on %s:%d", self.rank, environment.stage, tensor_rank,
                 environment.pod_ip, self.port)

    # ---- gRPC (server threads) --------------------------------------------------------------------
    def Describe(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.WorkerInfo:
        return pb.WorkerInfo(rank=self.rank, num_blocks=self.runner.num_blocks, max_model_len=self.runner.max_model_len,
                             device=str(self.runner.device), dtype=str(self.runner.dtype).removeprefix("torch."))

    def InitCache(self, request: pb.InitCacheRequest, context: grpc.ServicerContext) -> pb.Empty:
        self.inbox.put(("init", request.num_blocks))
        return pb.Empty()

    def Execute(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.Empty:
        if not self.state.is_last_stage:
            self.forward_queue.put(request)
        self.inbox.put(("step", request))
        return pb.Empty()

    def Outputs(self, request: pb.Empty, context: grpc.ServicerContext):  # noqa: ANN201 - a stream of StepOutput
        while context.is_active():
            try:
                yield self.outputs.get(timeout=0.5)
            except queue.Empty:
                continue

    def Heartbeat(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Empty:
        self.last_heartbeat = time.monotonic()
        return pb.Empty()

    def GetTimeline(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Timeline:
        return pb.Timeline(spans=list(self.spans))

    def Shutdown(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Empty:
        self.inbox.put(("stop", None))
        return pb.Empty()

    # ---- threads ----------------------------------------------------------------------------------
    def _forward(self) -> None:
        """Pass every control message to the next stage in order, without waiting for this rank's compute."""
        next_rank = self.state.global_rank(self.state.stage + 1, self.tensor_rank)
        address = self.store.get(WORKER_KEY.format(rank=next_rank)).decode()
        stub = pb_grpc.WorkerStub(grpc.insecure_channel(address, options=channel_options()))
        while (request := self.forward_queue.get()) is not None:
            try:
                stub.Execute(request, timeout=30)
            except grpc.RpcError as error:
                die(f"rank {self.rank}: the next stage ({address}) stopped answering: {error.code().name}")

    def _watchdog(self) -> None:
        while True:
            time.sleep(1.0)
            if time.monotonic() - self.last_heartbeat > self.heartbeat_timeout:
                die(f"rank {self.rank}: no heartbeat from the master for {self.heartbeat_timeout:.0f}s")

    # ---- the compute loop (main thread) -------------------------------------------------------------
    def run(self) -> None:
        threading.Thread(target=self._watchdog, name="orca-watchdog", daemon=True).start()
        if not self.state.is_last_stage:
            threading.Thread(target=self._forward, name="orca-forward", daemon=True).start()
        while True:
            kind, payload = self.inbox.get()
            if kind == "stop":
                break
            if kind == "init":
                self.runner.initialize_cache(payload)
                continue
            try:
                self._step(payload)
            except Exception as error:  # tell the master what happened, then leave: the replica is broken
                traceback.print_exc()
                if self.state.is_last_stage and self.tensor_rank == 0:
                    self.outputs.put(pb.StepOutput(step_id=payload.step_id, error=f"rank {self.rank}: {error!r}"))
                    time.sleep(1.0)
                die(f"rank {self.rank}: step {payload.step_id} failed: {error!r}")
        self.forward_queue.put(None)
        self.server.stop(grace=1.0)

    def _step(self, request: pb.StepRequest) -> None:
        batch = self.mirror.apply(request)
        start = time.time()
        intermediate = None
        if not self.state.is_first_stage:
            shape = (batch.num_tokens, self.hidden_size)
            hidden, residual = parallel_state.receive_from_previous_stage([shape, shape], self.runner.dtype,
                                                                           self.runner.device)
            intermediate = (hidden, residual)
        result = self.runner.run(batch, intermediate)
        if not self.state.is_last_stage:
            parallel_state.send_to_next_stage(list(result))
        elif self.tensor_rank == 0:
            self.outputs.put(output_to_proto(request.step_id, result))
        self.mirror.forget(request)
        self.spans.append(pb.StageSpan(step_id=request.step_id, stage=self.state.stage, tensor_rank=self.tensor_rank,
                                       start=start, end=time.time()))


def die(reason: str) -> None:
    """Leave at once with a failure: the replica cannot go on without this rank, and Kubernetes restarts it."""
    log.error("%s; exiting", reason)
    sys.stderr.flush()
    os._exit(1)


def die_with_parent() -> None:
    """Ask Linux for SIGKILL when the launcher exits; if it already has, leave now."""
    import ctypes
    import signal

    parent = os.environ.get(PARENT_PID)
    if not parent:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not glibc: the heartbeat watchdog still ends this worker
        return
    if os.getppid() != int(parent):
        die("the process that started this worker is gone")


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="orca-worker")
    parser.add_argument("--config", required=True, help="the EngineConfig as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    environment = WorkerEnvironment.from_environ()
    worker = Worker(EngineConfig(**json.loads(args.config)), environment, int(os.environ.get(TENSOR_RANK) or 0))
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
