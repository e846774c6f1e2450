"""RMSNorm with the residual add fused in, one program per token row, in place.

Fusing saves a round trip of the hidden state through memory per layer: the sum `x + residual` is
written once (as the next residual) and normalized from registers. The rounding points follow the
engine's torch code exactly, so the GPU path and the portable path agree up to the float32 sum order:
the sum is rounded to the activation dtype before it is normed (it is stored in that dtype anyway),
and the normalized value is rounded to that dtype before the weight multiplies it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fused_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, eps, x_stride, residual_stride, hidden,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x_row = x_ptr + row * x_stride + cols
    residual_row = residual_ptr + row * residual_stride + cols
    dtype = x_ptr.dtype.element_ty
    total = tl.load(x_row, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        total = (total.to(tl.float32) + tl.load(residual_row, mask=mask, other=0.0).to(tl.float32)).to(dtype)
    tl.store(residual_row, total, mask=mask)  # without a residual this saves the layer input: residual := x
    total = total.to(tl.float32)
    variance = tl.sum(total * total, axis=0) / hidden
    normed = (total * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_row, (weight * normed).to(dtype), mask=mask)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, hidden]. Returns (x, residual), both overwritten: the normed sum and the sum itself.

    Without a residual (the first layer) a new residual tensor receives x before x is normed.
    """
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.shape == (x.shape[1],) and weight.is_contiguous()
    if residual is None:
        residual = torch.empty_like(x)
        has_residual = False
    else:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
        has_residual = True
    rows, hidden = x.shape
    if rows:
        block = triton.next_power_of_2(hidden)
        _fused_add_rms_norm_kernel[(rows,)](
            x, residual, weight, eps, x.stride(0), residual.stride(0), hidden,
            HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
        )
    return x, residual


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's torch semantics, applied in place to the same tensors as the kernel."""
    if residual is None:
        residual = x.clone()
    else:
        torch.add(x, residual, out=residual)
    total = residual.float()
    normed = (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    x.copy_(weight * normed)
    return x, residual
