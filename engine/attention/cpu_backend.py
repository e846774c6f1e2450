"""CPU attention: C++ kernels that read the paged KV cache in place, for decode rows and prompt chunks alike.

Nothing is gathered and nothing is built per step beyond the neutral metadata: a prompt chunk with
earlier context (chunked prefill, a prefix-cache hit) reads that context from its blocks, as a decode does.
"""
from __future__ import annotations

from types import ModuleType

import torch

from .metadata import AttentionMetadata


class CpuAttentionBackend:
    HEAD_DIMS = (32, 64, 96, 128, 256)  # the kernels' compiled specializations
    MAX_GROUP = 16  # query heads per KV head (the decode kernel keeps one query per head in registers)
    supports_cuda_graphs = False

    @classmethod
    def supports(cls, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
        return head_dim in cls.HEAD_DIMS and num_heads // num_kv_heads <= cls.MAX_GROUP \
            and dtype in (torch.float32, torch.bfloat16)

    def __init__(self, num_kv_heads: int, kernels: ModuleType) -> None:
        self.num_kv_heads = num_kv_heads
        self.kernels = kernels

    def build(self, meta: AttentionMetadata) -> torch.Tensor:
        """The slots the step writes: padded rows (past num_actual_tokens) write nothing."""
        return meta.slot_mapping[:meta.num_actual_tokens]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, store_slots: torch.Tensor,
                scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; caches: [slots, KVH, D]. Returns [T, H, D].

        The step's own K and V go into the cache first, so both kernels find every position there.
        """
        self.kernels.reshape_and_cache(k, v, k_cache, v_cache, store_slots)
        q = q.contiguous()
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            self.kernels.paged_decode_attention(out[:n], q[:n], k_cache, v_cache, meta.block_tables[:n],
                                                meta.seq_lens[:n], meta.block_size, scale)
        if meta.num_reqs > n:
            self.kernels.paged_prefill_attention(out, q, k_cache, v_cache, meta.block_tables[n:],
                                                 meta.query_start_loc[n:], meta.seq_lens[n:], meta.block_size, scale)
        return out
