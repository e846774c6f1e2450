"""Executors run the scheduler's batches on the model: in this process, or on distributed workers.

The engine loop sees only `execute_model(batch) -> Future` and `max_concurrent_batches`; with a
pipeline of `pp` stages the multiprocess executor keeps up to `pp` batches in flight, in this process
there is one at a time and the future is done on return (vLLM's executor names).
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

import torch

from .config import EngineConfig
from .distributed.contract import WorkerEnvironment
from .loaders import LoadedModel
from .scheduler import SampledTokens, ScheduledBatch


class Executor(Protocol):
    num_blocks: int
    max_model_len: int
    max_concurrent_batches: int
    device: torch.device
    dtype: torch.dtype

    def execute_model(self, batch: ScheduledBatch) -> Future[SampledTokens]: ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    """The model runner in this process: no copies of the batch, no threads."""

    max_concurrent_batches = 1

    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        from .model_runner import ModelRunner

        self.runner = ModelRunner(config, loaded)
        self.runner.initialize_cache(self.runner.num_blocks)
        self.num_blocks, self.max_model_len = self.runner.num_blocks, self.runner.max_model_len
        self.device, self.dtype = self.runner.device, self.runner.dtype

    def execute_model(self, batch: ScheduledBatch) -> Future[SampledTokens]:
        future: Future[SampledTokens] = Future()
        future.set_result(self.runner.run(batch))
        return future

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig, loaded: LoadedModel, environment: WorkerEnvironment | None = None) -> Executor:
    """In this process for one rank, unless the worker path is asked for; else one process per rank.

    `environment`: the pod's distributed contract when the other stages run in pods of their own.
    """
    backend = config.distributed_executor_backend or ("uni" if config.world_size == 1 else "mp")
    if backend == "uni":
        if config.world_size != 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one rank, not {config.world_size}")
        return UniProcExecutor(config, loaded)
    if backend == "mp":
        from .distributed.executor import MultiprocExecutor

        return MultiprocExecutor(config, loaded, environment)
    raise ValueError(f"distributed_executor_backend={backend!r} must be 'uni' or 'mp'")
