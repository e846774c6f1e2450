"""Rotary position embeddings (rotate-half layout, as in Hugging Face Llama checkpoints)."""
from __future__ import annotations

import torch
from torch import nn

from orca.kernels import ops


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # [position, cos | sin]; cast with the model to its dtype, as the reference casts cos and sin
        self.register_buffer("cos_sin", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]; one gather of cos/sin for all heads."""
        return ops.rotary_embedding(positions, q, k, self.cos_sin)
