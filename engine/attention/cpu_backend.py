"""CPU attention: single-query rows by the C++ kernel that reads the paged cache in place, prompt chunks
as in the torch backend (SDPA runs at the CPU's GEMM speed there)."""
from __future__ import annotations

from types import ModuleType

import torch

from .metadata import AttentionMetadata
from .torch_backend import DecodeGroup, TorchAttentionBackend, TorchAttentionMetadata


class CpuAttentionBackend(TorchAttentionBackend):
    HEAD_DIMS = (32, 64, 96, 128, 256)  # the kernel's compiled specializations
    MAX_GROUP = 16  # query heads per KV head

    @classmethod
    def supports(cls, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
        return head_dim in cls.HEAD_DIMS and num_heads // num_kv_heads <= cls.MAX_GROUP \
            and dtype in (torch.float32, torch.bfloat16)

    def __init__(self, num_kv_heads: int, kernels: ModuleType) -> None:
        super().__init__(num_kv_heads)
        self.kernels = kernels

    def _decode_groups(self, meta: AttentionMetadata) -> list[DecodeGroup]:
        return []  # the kernel reads single-query rows' context in place: nothing to gather

    def decode(self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, built: TorchAttentionMetadata, scale: float) -> None:
        n = meta.num_decodes
        self.kernels.paged_decode_attention(out, q.contiguous(), k_cache, v_cache, meta.block_tables[:n],
                                            meta.seq_lens[:n], meta.block_size, scale)
