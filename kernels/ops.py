"""The one kernel facade the layers call: each op dispatches by the tensor's device.

CUDA runs the Triton kernels (`triton/`), CPUs the C++ kernels (`csrc/`, built on first use), and
anything else the plain torch code below. The choice is made once per device type, here and nowhere
else (the attention backends follow it too).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from collections.abc import Iterator

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


_gemm_mode = threading.local()


@contextlib.contextmanager
def batch_invariant_gemms(enabled: bool) -> Iterator[None]:
    """Within this block `linear` computes each row the same way whatever else shares the call.

    The packed oneDNN GEMM is not batch invariant: past some row count it splits a long reduction
    (the MLP's down projection) differently. Steps with a seeded request, or a batch-invariant engine,
    take the plain GEMM, which is; every other step takes the faster packed one.
    """
    previous = getattr(_gemm_mode, "invariant", False)
    _gemm_mode.invariant = enabled
    try:
        yield
    finally:
        _gemm_mode.invariant = previous


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's blocked layout, for `linear`, or None where the plain weight serves.

    `F.linear` on CPU re-lays a bf16 weight out for oneDNN on every call; packed once after loading,
    the GEMMs run 1.07x (thousands of rows) to 2x (a few rows) faster here, for a second copy of every
    weight in memory. float32 keeps MKL's GEMM.
    """
    if provider(weight.device.type) != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available() \
            or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T`, by the packed GEMM where there is one, unless rows must not depend on the batch.

    Plain `F.linear` is batch invariant with one exception, handled here: on CPUs a one-row product goes to a GEMV that splits the reduction differently from the GEMM
    that two rows or more take, so in bf16 a decode running alone gets logits a few last bits away
    from the same decode beside others, and a seeded sample can flip. Two rows always take the GEMM,
    so a lone row is computed as two. (GPU libraries pick kernels by shape too; their kernels answer
    for that.)
    """
    if packed is not None and not getattr(_gemm_mode, "invariant", False):
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if x.shape[0] == 1 and x.device.type == "cpu":
        return F.linear(x.expand(2, -1).contiguous(), weight)[:1]
    return F.linear(x, weight)


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
