"""Tensor-parallel group state. World size 1 until the distributed-execution issue starts real groups."""
from __future__ import annotations

import torch
import torch.distributed as dist

_tp_group: dist.ProcessGroup | None = None


def tp_rank() -> int:
    return dist.get_rank(_tp_group) if _tp_group is not None else 0


def tp_size() -> int:
    return dist.get_world_size(_tp_group) if _tp_group is not None else 1


def set_tp_group(group: dist.ProcessGroup | None) -> None:
    global _tp_group
    _tp_group = group


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        dist.all_reduce(x, group=_tp_group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.all_gather(parts, x.contiguous(), group=_tp_group)
    return torch.cat(parts, dim=-1)
