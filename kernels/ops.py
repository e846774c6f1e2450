"""The one kernel facade the layers call: each op dispatches by the tensor's device.

CUDA runs the Triton kernels (`triton/`), CPUs the C++ kernels (`csrc/`, built on first use), and
anything else the plain torch code below. The choice is made once per device type, here and nowhere
else (the attention backends follow it too).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from . import cpu


@functools.cache
def provider(device_type: str) -> str:
    """"triton", "cpu" or "torch": which implementation serves tensors on this device type.

    `ORCA_KERNELS` overrides the choice: `torch` everywhere, or `triton` on any device (on CPUs only
    under `TRITON_INTERPRET=1`, which is how the engine is tested on Triton without a GPU).
    """
    forced = os.environ.get("ORCA_KERNELS", "auto")
    if forced in ("torch", "triton"):
        return forced
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    if device_type == "cpu" and cpu.load() is not None:
        return "cpu"
    return "torch"


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new residual) where the residual stream is `x + residual`, normed in float32.

    The kernels work in place: `x` must be a fresh activation the caller no longer needs.
    """
    kind = provider(x.device.type)
    if kind == "cpu":
        residual = torch.zeros_like(x) if residual is None else residual
        cpu.load().fused_add_rms_norm(x, residual, weight, eps)
        return x, residual
    if kind == "triton":
        from .triton.rms_norm import fused_add_rms_norm as triton_fused_add_rms_norm

        return triton_fused_add_rms_norm(x, residual, weight, eps)
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype), x


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [T, H, D] and k [T, KVH, D]; cos_sin is [positions, cos | sin]."""
    kind = provider(q.device.type)
    if kind == "cpu":
        cpu.load().rotary_embedding(positions, q, k, cos_sin)
        return q, k
    if kind == "triton":
        from .triton.rotary import rotary_embedding as triton_rotary_embedding

        triton_rotary_embedding(positions, q, k, cos_sin)
        return q, k
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    kind = provider(gate_up.device.type)
    if kind == "torch":
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    if kind == "cpu":
        cpu.load().silu_and_mul(out, gate_up)
    else:
        from .triton.activation import silu_and_mul as triton_silu_and_mul

        triton_silu_and_mul(out, gate_up)
    return out
