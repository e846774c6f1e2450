"""The master's side of a distributed replica: scheduler batches out to the workers, tokens back.

Up to `pipeline_parallel_size` batches are in flight: `execute_model` encodes a batch as a diff,
sends it to every tensor rank of the first stage and returns a future, which the thread reading the
last stage's output stream completes. A heartbeat thread checks every worker (and every local
process) each second; the first failure fails every pending and future step with `WorkerFailure`,
so nothing waits on a dead replica.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from concurrent.futures import Future

import grpc
import torch
import torch.distributed as dist

from ..config import EngineConfig
from ..device import resolve_device, share_of_memory
from ..layers.linear import check_heads
from ..loaders import LoadedModel
from ..models.llama import stage_layers
from ..scheduler import SampledTokens, ScheduledBatch
from . import worker_pb2 as pb
from . import worker_pb2_grpc as pb_grpc
from .contract import WorkerEnvironment
from .control import ControlEncoder, output_from_proto
from .launch import start_worker, stop_workers, threads_per_worker
from .worker import STORE_TIMEOUT_SECONDS, WORKER_KEY, channel_options

log = logging.getLogger("orca.executor")

HEARTBEAT_SECONDS = 1.0
RPC_TIMEOUT_SECONDS = 10.0


class WorkerFailure(RuntimeError):
    """A worker died or stopped answering: the replica cannot serve until it is restarted."""


def check_parallelism(config: EngineConfig, loaded: LoadedModel) -> None:
    """Refuse a layout the model cannot take before any process starts (ValueError naming the flag)."""
    model = loaded.config
    check_heads(model.num_heads, model.num_kv_heads, config.tensor_parallel_size)
    stage_layers(model.num_layers, config.pipeline_parallel_size, 0)
    if model.intermediate_size % config.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size} must divide the model's "
                         f"intermediate size {model.intermediate_size}")


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, environment: WorkerEnvironment | None = None) -> None:
        """`environment`: this pod's contract, whose other stages run in their own pods; None: every rank here."""
        check_parallelism(config, loaded)
        tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
        self.max_concurrent_batches = pp
        self.encoder = ControlEncoder()
        self.pending: dict[int, tuple[Future[SampledTokens], list[bool]]] = {}
        self.lock = threading.Lock()
        self.error: WorkerFailure | None = None
        self.closed = False
        in_pod = environment is not None
        host = "0.0.0.0" if in_pod else "127.0.0.1"
        self.store = dist.TCPStore(host, environment.master_port if in_pod else 0, is_master=True,
                                   wait_for_workers=False, timeout=datetime.timedelta(seconds=STORE_TIMEOUT_SECONDS))
        if environment is None:
            environment = WorkerEnvironment(tp, pp, master_port=self.store.port, worker_port=0)
        local_stages = [0] if in_pod else list(range(pp))
        num_local = tp * len(local_stages)
        threads = threads_per_worker(num_local)
        if resolve_device(config.device).type == "cpu":  # the local ranks share this host's memory
            config = dataclasses.replace(config, kv_cache_memory=share_of_memory(config.kv_cache_memory, num_local))
        self.processes = [start_worker(config, dataclasses.replace(environment, stage=stage),
                                       tensor_rank, threads)
                          for stage in local_stages for tensor_rank in range(tp)]
        try:
            self.stubs = self._connect(tp * pp)
            infos = [stub.Describe(pb.Empty(), timeout=RPC_TIMEOUT_SECONDS) for stub in self.stubs]
            self.num_blocks = min(info.num_blocks for info in infos)
            self.max_model_len = min(info.max_model_len for info in infos)
            self.device = torch.device(infos[0].device)
            self.dtype = getattr(torch, infos[0].dtype)
            for stub in self.stubs:
                stub.InitCache(pb.InitCacheRequest(num_blocks=self.num_blocks), timeout=RPC_TIMEOUT_SECONDS)
        except BaseException:
            self.shutdown()
            raise
        self.first_stage = self.stubs[:tp]
        self.last_stage = self.stubs[(pp - 1) * tp]
        threading.Thread(target=self._read_outputs, name="orca-outputs", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="orca-heartbeat", daemon=True).start()

    def _connect(self, world_size: int) -> list[pb_grpc.WorkerStub]:
        """Wait until every rank has published its address (bounded; a local process that exits fails at once)."""
        deadline = time.monotonic() + STORE_TIMEOUT_SECONDS
        keys = [WORKER_KEY.format(rank=rank) for rank in range(world_size)]
        while not self.store.check(keys):
            for process in self.processes:
                if process.poll() is not None:
                    raise WorkerFailure(f"worker process {process.pid} exited with code {process.returncode} "
                                        f"while starting")
            if time.monotonic() > deadline:
                raise WorkerFailure(f"workers did not all start within {STORE_TIMEOUT_SECONDS:.0f}s")
            time.sleep(0.1)
        addresses = [self.store.get(key).decode() for key in keys]
        return [pb_grpc.WorkerStub(grpc.insecure_channel(address, options=channel_options())) for address in addresses]

    # ---- the engine's side --------------------------------------------------------------------------
    def execute_model(self, batch: ScheduledBatch) -> Future[SampledTokens]:
        future: Future[SampledTokens] = Future()
        if self.error is not None:
            future.set_exception(self.error)
            return future
        step = self.encoder.encode(batch)
        with self.lock:
            self.pending[step.step_id] = (future, [seq.params.logprobs is not None for seq in batch.seqs])
        try:
            for stub in self.first_stage:
                stub.Execute(step, timeout=RPC_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            self._fail(f"the first stage stopped answering: {error.code().name}")
        return future

    def timeline(self) -> list[pb.StageSpan]:
        """Every rank's compute spans, for tests and traces of the pipeline."""
        return [span for stub in self.stubs for span in stub.GetTimeline(pb.Empty(), timeout=RPC_TIMEOUT_SECONDS).spans]

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stub in getattr(self, "stubs", []):
            try:
                stub.Shutdown(pb.Empty(), timeout=2.0)
            except grpc.RpcError:
                pass
        stop_workers(self.processes)

    # ---- background threads ---------------------------------------------------------------------------
    def _read_outputs(self) -> None:
        try:
            for output in self.last_stage.Outputs(pb.Empty()):
                with self.lock:
                    future, wants_logprobs = self.pending.pop(output.step_id)
                if output.error:
                    self._fail(output.error)
                    return
                future.set_result(output_from_proto(output, wants_logprobs))
        except grpc.RpcError as error:
            if not self.closed:
                self._fail(f"the last stage's output stream broke: {error.code().name}")

    def _heartbeat(self) -> None:
        while not self.closed and self.error is None:
            for process in self.processes:
                if process.poll() is not None:
                    self._fail(f"worker process {process.pid} exited with code {process.returncode}")
                    return
            for rank, stub in enumerate(self.stubs):
                try:
                    stub.Heartbeat(pb.Empty(), timeout=RPC_TIMEOUT_SECONDS / 2)
                except grpc.RpcError as error:
                    if not self.closed:
                        self._fail(f"worker rank {rank} stopped answering: {error.code().name}")
                    return
            time.sleep(HEARTBEAT_SECONDS)

    def _fail(self, reason: str) -> None:
        with self.lock:
            if self.error is not None:
                return
            self.error = WorkerFailure(f"distributed worker failed: {reason}")
            pending, self.pending = list(self.pending.values()), {}
        log.error("%s", self.error)
        for future, _ in pending:
            future.set_exception(self.error)
