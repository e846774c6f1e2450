"""CUDA attention by Triton kernels: the KV store by slot mapping, then one paged-attention launch for
decodes and one for prompt chunks, reading only the neutral metadata (so CUDA graphs can capture it)."""
from __future__ import annotations

import torch

from orca.kernels.triton.attention import paged_attention
from orca.kernels.triton.store_kvcache import store_kvcache

from .metadata import AttentionMetadata


class TritonAttentionBackend:
    supports_cuda_graphs = True  # no host work per step beyond what the metadata already holds

    def __init__(self, num_kv_heads: int) -> None:
        self.num_kv_heads = num_kv_heads

    def build(self, meta: AttentionMetadata) -> None:
        return None  # the kernels take the metadata as it is

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, built: None, scale: float) -> torch.Tensor:
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        paged_attention(q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                        meta.block_size, scale, meta.num_decodes, max_seq_len=meta.max_seq_len)
        return out
