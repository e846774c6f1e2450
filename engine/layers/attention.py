"""The attention layer: a per-layer handle on its slice of the KV cache.

The runner picks one backend per step and builds its metadata once; every layer reads both from the
forward context, so the model knows no backend.
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention.metadata import get_forward_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)  # allocated by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        context = get_forward_context()
        out = context.backend.forward(q, k, v, self.k_cache, self.v_cache, context.metadata, context.built, self.scale)
        return out.view(q.shape[0], -1)
