"""RMSNorm with the residual add fused in, computed in float32 like the reference implementation."""
from __future__ import annotations

import torch
from torch import nn

from orca.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new residual); the residual stream is `x + residual`.

        The kernels work in place: `x` must be a fresh activation the caller no longer needs.
        """
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
