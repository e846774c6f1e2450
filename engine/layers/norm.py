"""RMSNorm with the residual add fused in, computed in float32 like the reference implementation."""
from __future__ import annotations

import torch
from torch import nn

from orca.kernels import cpu


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new residual); the residual stream is `x + residual`.

        The fused kernel works in place: `x` must be a fresh activation the caller no longer needs.
        """
        if (kernels := cpu.kernels_for(x)) is not None:
            residual = torch.zeros_like(x) if residual is None else residual
            kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is not None:
            x = x + residual
        return self._norm(x), x
