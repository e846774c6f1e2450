"""Which rank this process is in its replica, and the collectives the layers need.

Set once per process before the model is built (the layers read their shard at construction). In a
process that never joined a group (the single-process engine) every size is 1 and every collective is
a no-op, so the same model code runs alone and distributed. Tensor-parallel ranks of one stage share a
group for all-reduce and all-gather; pipeline stages pass activations point to point (gloo on CPU,
NCCL on GPU; both under torch.distributed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    tensor_rank: int = 0
    stage: int = 0
    tensor_group: dist.ProcessGroup | None = None

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pipeline_parallel_size - 1

    def global_rank(self, stage: int, tensor_rank: int) -> int:
        return stage * self.tensor_parallel_size + tensor_rank


_state = ParallelState()


def get() -> ParallelState:
    return _state


def set_state(state: ParallelState) -> None:
    global _state
    _state = state


def initialize(store: dist.Store, tensor_parallel_size: int, pipeline_parallel_size: int, stage: int,
               tensor_rank: int, backend: str, timeout_seconds: float) -> ParallelState:
    """Join the replica's world through the master's store and make this stage's tensor-parallel group."""
    import datetime

    world = tensor_parallel_size * pipeline_parallel_size
    rank = stage * tensor_parallel_size + tensor_rank
    timeout = datetime.timedelta(seconds=timeout_seconds)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    group = None
    for s in range(pipeline_parallel_size):  # every rank must create every group, in the same order
        ranks = list(range(s * tensor_parallel_size, (s + 1) * tensor_parallel_size))
        made = dist.new_group(ranks, timeout=timeout) if tensor_parallel_size > 1 else None
        if s == stage:
            group = made
    state = ParallelState(tensor_parallel_size, pipeline_parallel_size, tensor_rank, stage, group)
    set_state(state)
    return state


def tp_rank() -> int:
    return _state.tensor_rank


def tp_size() -> int:
    return _state.tensor_parallel_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.tensor_parallel_size > 1:
        dist.all_reduce(x, group=_state.tensor_group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _state.tensor_parallel_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tensor_parallel_size)]
    dist.all_gather(parts, x.contiguous(), group=_state.tensor_group)
    return torch.cat(parts, dim=-1)


def send_to_next_stage(tensors: list[torch.Tensor]) -> None:
    """Activations to the same tensor rank of the next stage (every rank of a stage holds them whole)."""
    peer = _state.global_rank(_state.stage + 1, _state.tensor_rank)
    for tensor in tensors:
        dist.send(tensor.contiguous(), peer)


def receive_from_previous_stage(shapes: list[tuple[int, ...]], dtype: torch.dtype,
                                device: torch.device) -> list[torch.Tensor]:
    peer = _state.global_rank(_state.stage - 1, _state.tensor_rank)
    out = []
    for shape in shapes:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(tensor, peer)
        out.append(tensor)
    return out
