"""The attention backend for a device, following the kernel facade's choice for that device."""
from __future__ import annotations

import torch

from orca.kernels import cpu, ops

from .torch_backend import TorchAttentionBackend


def select_backend(device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> TorchAttentionBackend:
    """The facade's kernels for this device where they cover the model's shape, else the torch backend."""
    kind = ops.provider(device.type)
    if kind == "cpu":
        from .cpu_backend import CpuAttentionBackend

        if CpuAttentionBackend.supports(num_heads, num_kv_heads, head_dim, dtype):
            return CpuAttentionBackend(num_kv_heads, cpu.load())
    if kind == "triton":
        from .triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(num_kv_heads)
    return TorchAttentionBackend(num_kv_heads)
